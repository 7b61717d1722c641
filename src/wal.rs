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
/// The content of a stored WAL archive file (a zstd frame), refused past `limit` bytes: a
/// hostile frame that expands without end stops there, before it is in memory.
pub fn decode_limited(stored: impl std::io::Read, limit: u64) -> Result<Vec<u8>, String> {
    use std::io::Read;
    let decoder =
        zstd::stream::read::Decoder::new(stored).map_err(|e| format!("it does not decode: {e}"))?;
    let mut raw = Vec::new();
    decoder
        .take(limit + 1)
        .read_to_end(&mut raw)
        .map_err(|e| format!("it does not decode: {e}"))?;
    if raw.len() as u64 > limit {
        return Err(format!("it decodes to more than {limit} bytes"));
    }
    Ok(raw)
}

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

/// The fixed part of the first page of a WAL segment file: PostgreSQL's
/// `XLogLongPageHeaderData`, in the byte order of the hosts lifeboat runs on (little-endian).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SegmentHeader {
    pub magic: u16,
    pub timeline: u32,
    pub page_address: u64,
    pub system_identifier: u64,
    pub segment_size: u64,
    pub block_size: u32,
}

/// `XLP_LONG_HEADER`: set on the first page of every segment.
const LONG_HEADER_FLAG: u16 = 0x0002;
const LONG_HEADER_SIZE: usize = 40;
const SHORT_HEADER_SIZE: usize = 24;

/// `XLOG_PAGE_MAGIC` of each PostgreSQL release lifeboat knows, by major version. A release
/// changes it whenever the WAL format changes, so it names the server that wrote a segment.
const PAGE_MAGICS: [(u32, u16); 9] = [
    (10, 0xD097),
    (11, 0xD098),
    (12, 0xD101),
    (13, 0xD106),
    (14, 0xD10D),
    (15, 0xD110),
    (16, 0xD113),
    (17, 0xD116),
    (18, 0xD118),
];

/// The WAL page magic of PostgreSQL `major`, when lifeboat knows that release.
pub fn page_magic_of(major: u32) -> Option<u16> {
    PAGE_MAGICS
        .iter()
        .find(|(version, _)| *version == major)
        .map(|(_, magic)| *magic)
}

/// The PostgreSQL release whose WAL carries `magic`, when lifeboat knows it.
pub fn major_of_page_magic(magic: u16) -> Option<u32> {
    PAGE_MAGICS
        .iter()
        .find(|(_, known)| *known == magic)
        .map(|(version, _)| *version)
}

/// Every PostgreSQL release so far has used a magic in this range; a later one will too,
/// and is accepted until the job's cluster record pins the magic.
fn is_page_magic(magic: u16) -> bool {
    (0xD000..=0xD1FF).contains(&magic)
}

impl SegmentHeader {
    /// Reads the long page header at the start of `bytes`; says what is wrong when there is
    /// none.
    pub fn read(bytes: &[u8]) -> std::result::Result<SegmentHeader, String> {
        let Some(header) = bytes.get(..LONG_HEADER_SIZE) else {
            return Err(format!(
                "it is {} bytes long, too short to hold a WAL page header",
                bytes.len()
            ));
        };
        let u16_at = |at: usize| u16::from_le_bytes([header[at], header[at + 1]]);
        let u32_at =
            |at: usize| u32::from_le_bytes(header[at..at + 4].try_into().expect("4 bytes"));
        let u64_at =
            |at: usize| u64::from_le_bytes(header[at..at + 8].try_into().expect("8 bytes"));
        let magic = u16_at(0);
        if !is_page_magic(magic) {
            return Err(format!(
                "it does not start with a WAL page header (magic 0x{magic:04X}, not one PostgreSQL writes)"
            ));
        }
        if u16_at(2) & LONG_HEADER_FLAG == 0 {
            return Err(
                "its first page header is not the long header a segment starts with".to_string(),
            );
        }
        let header = SegmentHeader {
            magic,
            timeline: u32_at(4),
            page_address: u64_at(8),
            system_identifier: u64_at(24),
            segment_size: u64::from(u32_at(32)),
            block_size: u32_at(36),
        };
        if !is_segment_size(header.segment_size) {
            return Err(format!(
                "its header gives a segment size of {} bytes, which PostgreSQL does not use",
                header.segment_size
            ));
        }
        if !(header.block_size.is_power_of_two() && (1024..=65536).contains(&header.block_size)) {
            return Err(format!(
                "its header gives a WAL block size of {} bytes, which PostgreSQL does not use",
                header.block_size
            ));
        }
        Ok(header)
    }
}

/// Checks that `bytes` can be the WAL file `file` (a segment or a `.partial` one): a long
/// page header whose page address is where the name says, on the name's timeline or an
/// ancestor (a new timeline's first segment is a copy of its parent's), and the size the
/// header gives (a `.partial` file may be shorter). Says what does not match.
pub fn check_segment(file: &WalFile, bytes: &[u8]) -> std::result::Result<SegmentHeader, String> {
    let mut check = SegmentCheck::new(file);
    check.feed(bytes);
    check.finish()
}

/// `check_segment` over a file read piece by piece, in pieces of any size: the same verdict,
/// without the whole segment in memory.
///
/// Every page of a segment starts with a header, which PostgreSQL writes as it reaches each
/// page, up to where a WAL switch ended the segment: the rest is zeros. Each header must
/// carry the segment's magic, its own address, and a timeline that never goes back and never
/// passes the name's. A `.partial` file ends where its timeline did, and what follows is
/// whatever the recycled file held: its pages are read up to the first one that is not the
/// next.
pub struct SegmentCheck<'f> {
    file: &'f WalFile,
    /// The first bytes, until they hold the long header.
    start: Vec<u8>,
    header: Option<std::result::Result<SegmentHeader, String>>,
    /// The newest timeline a page header has given so far.
    timeline: u32,
    /// The bytes of a page that began in an earlier piece.
    page: Vec<u8>,
    /// Bytes fed so far.
    size: u64,
    pages: Pages,
}

enum Pages {
    Checking,
    /// A WAL switch ended the segment at this byte: only zeros may follow.
    Zeros,
    /// A `.partial` file's timeline ended: what follows is not read.
    Ended,
    Damaged(String),
}

impl<'f> SegmentCheck<'f> {
    pub fn new(file: &'f WalFile) -> SegmentCheck<'f> {
        SegmentCheck {
            file,
            start: Vec::with_capacity(LONG_HEADER_SIZE),
            header: None,
            timeline: 0,
            page: Vec::new(),
            size: 0,
            pages: Pages::Checking,
        }
    }

    pub fn feed(&mut self, mut bytes: &[u8]) {
        if self.header.is_none() {
            let take = (LONG_HEADER_SIZE - self.start.len()).min(bytes.len());
            self.start.extend_from_slice(&bytes[..take]);
            if self.start.len() == LONG_HEADER_SIZE {
                let header = SegmentHeader::read(&self.start);
                match &header {
                    Ok(header) => self.timeline = header.timeline,
                    // Without a header there are no pages to check; `finish` says why.
                    Err(_) => self.pages = Pages::Ended,
                }
                self.header = Some(header);
            } else {
                // Nothing is checked before the header is whole; it lies within the first
                // page, which is not checked as a page.
                self.size += bytes.len() as u64;
                return;
            }
        }
        let block = match &self.header {
            Some(Ok(header)) => u64::from(header.block_size),
            _ => u64::MAX,
        };
        while !bytes.is_empty() {
            let at = self.size;
            match &self.pages {
                Pages::Checking => {}
                Pages::Zeros => {
                    if let Some(nonzero) = bytes.iter().position(|b| *b != 0) {
                        let at = at + nonzero as u64;
                        let header = self.header.as_ref().and_then(|h| h.as_ref().ok());
                        // Pages are read before `finish` holds the address to the name: a hostile
                        // one must not overflow.
                        let address = header.map_or(0, |h| h.page_address).wrapping_add(at);
                        self.pages = Pages::Damaged(format!(
                            "it holds data at byte {at} (WAL {}) after the empty pages that end it: the segment is damaged",
                            Lsn(address)
                        ));
                    }
                    self.size += bytes.len() as u64;
                    return;
                }
                Pages::Ended | Pages::Damaged(_) => {
                    self.size += bytes.len() as u64;
                    return;
                }
            }
            // The first page holds the long header, checked on its own.
            if at < block {
                let skip = (block - at).min(bytes.len() as u64) as usize;
                self.size += skip as u64;
                bytes = &bytes[skip..];
                continue;
            }
            let block = block as usize;
            if self.page.is_empty() && bytes.len() >= block {
                let (page, rest) = bytes.split_at(block);
                self.check_page(at, page);
                self.size += block as u64;
                bytes = rest;
                continue;
            }
            let take = (block - self.page.len()).min(bytes.len());
            self.page.extend_from_slice(&bytes[..take]);
            self.size += take as u64;
            bytes = &bytes[take..];
            if self.page.len() == block {
                let page = std::mem::take(&mut self.page);
                self.check_page(self.size - block as u64, &page);
            }
        }
    }

    /// Whether reading on can change the verdict: not once the file has no header, or is
    /// longer than the segment its header gives.
    pub fn settled(&self) -> bool {
        match &self.header {
            Some(Ok(header)) => self.size > header.segment_size,
            Some(Err(_)) => true,
            None => false,
        }
    }

    /// Reading stopped once `settled`: the file is `length` bytes long, for the verdict.
    pub fn stopped_at(&mut self, length: u64) {
        self.size = self.size.max(length);
    }

    /// Checks the page that starts at byte `at`.
    fn check_page(&mut self, at: u64, page: &[u8]) {
        let Some(Ok(header)) = &self.header else {
            return;
        };
        let address = header.page_address.wrapping_add(at);
        let problem = match page.get(..SHORT_HEADER_SIZE) {
            None => Some("is cut short".to_string()),
            Some(page) => {
                let magic = u16::from_le_bytes([page[0], page[1]]);
                let page_timeline = u32::from_le_bytes(page[4..8].try_into().expect("4 bytes"));
                let page_address = u64::from_le_bytes(page[8..16].try_into().expect("8 bytes"));
                if magic != header.magic {
                    Some(format!(
                        "has magic 0x{magic:04X}, not the segment's 0x{:04X}",
                        header.magic
                    ))
                } else if page_address != address {
                    Some(format!("says it is at {}", Lsn(page_address)))
                } else if page_timeline < self.timeline || page_timeline > self.file.timeline {
                    Some(format!("says timeline {page_timeline}"))
                } else {
                    self.timeline = page_timeline;
                    None
                }
            }
        };
        self.pages = match (problem, self.file.kind) {
            (None, _) => Pages::Checking,
            (Some(_), WalFileKind::Partial) => Pages::Ended,
            // A WAL switch leaves the rest of the segment zeroed, headers and all.
            (Some(_), _) if page.iter().all(|b| *b == 0) => Pages::Zeros,
            (Some(problem), _) => Pages::Damaged(format!(
                "its page at byte {at} (WAL {}) {problem}: the segment is damaged past its first page",
                Lsn(address)
            )),
        };
    }

    /// The verdict on everything fed: the header, the size it gives, the name, and the pages.
    pub fn finish(mut self) -> std::result::Result<SegmentHeader, String> {
        let header = match self.header.take() {
            Some(header) => header?,
            None => return SegmentHeader::read(&self.start),
        };
        let size = self.size;
        match self.file.kind {
            WalFileKind::Segment if size != header.segment_size => {
                return Err(format!(
                    "it is {size} bytes long and its header gives segments of {} bytes: it is cut short or padded",
                    header.segment_size
                ));
            }
            WalFileKind::Partial if size > header.segment_size => {
                return Err(format!(
                    "it is {size} bytes long, more than the {} bytes its header gives a segment",
                    header.segment_size
                ));
            }
            _ => {}
        }
        let Some(segment) = self.file.segment(header.segment_size) else {
            return Err(format!(
                "its name is no segment of {} bytes",
                header.segment_size
            ));
        };
        let expected = segment * header.segment_size;
        if header.page_address != expected {
            let holds = header.page_address / header.segment_size;
            return Err(format!(
                "its header says it holds the WAL at {} (segment {}), not {} as its name says",
                Lsn(header.page_address),
                segment_name(self.file.timeline, holds, header.segment_size),
                Lsn(expected)
            ));
        }
        if header.timeline == 0 || header.timeline > self.file.timeline {
            return Err(format!(
                "its header says timeline {}, which cannot lead to timeline {} in its name",
                header.timeline, self.file.timeline
            ));
        }
        // The last page, when the file ends within it.
        if matches!(self.pages, Pages::Checking) && !self.page.is_empty() {
            let page = std::mem::take(&mut self.page);
            let at = size - page.len() as u64;
            self.check_page(at, &page);
        }
        match self.pages {
            Pages::Damaged(problem) => Err(problem),
            Pages::Checking | Pages::Zeros | Pages::Ended => Ok(header),
        }
    }
}

/// The most a timeline history file may be: one short line per ancestor.
const HISTORY_LIMIT: usize = 1 << 20;

/// The entries of the history file of `timeline`: each ancestor, oldest first, and where the
/// next timeline branched off it (`1\t0/3000000\tno recovery target specified`). Says what
/// is wrong with anything PostgreSQL would not read as one, or would follow somewhere it
/// cannot go: timeline 1 has no history, ancestors come in rising order below the timeline
/// itself, and branch points never go back.
pub fn check_history(timeline: u32, bytes: &[u8]) -> std::result::Result<Vec<(u32, Lsn)>, String> {
    if timeline < 2 {
        return Err("timeline 1 has no history: PostgreSQL never writes one".to_string());
    }
    if bytes.len() > HISTORY_LIMIT {
        return Err(format!("it is over {HISTORY_LIMIT} bytes"));
    }
    let text = std::str::from_utf8(bytes).map_err(|_| "it is not text".to_string())?;
    let mut entries: Vec<(u32, Lsn)> = Vec::new();
    for (number, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let mut fields = line.split_whitespace();
        let entry = fields
            .next()
            .and_then(|t| t.parse::<u32>().ok())
            .zip(fields.next().and_then(Lsn::parse))
            .ok_or_else(|| format!("line {} is not \"TIMELINE LSN REASON\"", number + 1))?;
        if let Some(&(previous, switched)) = entries.last()
            && (entry.0 <= previous || entry.1 < switched)
        {
            return Err(format!(
                "line {} goes back: timeline {} at {} after timeline {previous} at {switched}",
                number + 1,
                entry.0,
                entry.1
            ));
        }
        if entry.0 == 0 || entry.0 >= timeline {
            return Err(format!(
                "line {} names timeline {}, which is no ancestor of timeline {timeline}",
                number + 1,
                entry.0
            ));
        }
        entries.push(entry);
    }
    if entries.is_empty() {
        return Err("it names no ancestor".to_string());
    }
    Ok(entries)
}

/// The cluster whose WAL a job archives, as a repository records it (`cluster.json` beside
/// the job's backups): learned from the job's first backup or first archived segment, then
/// held against every segment pushed and every backup taken, so that one cluster's WAL
/// never lands among another's.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ClusterRecord {
    /// As `pg_control_system()` prints it: decimal.
    pub system_identifier: String,
    pub wal_segment_size: u64,
    /// Absent when it was learned from a server release lifeboat does not know.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wal_page_magic: Option<u16>,
    /// "backup ID" or "wal-push of NAME": where it came from, for the operator.
    pub learned_from: String,
    pub learned_at: chrono::DateTime<chrono::Utc>,
}

impl ClusterRecord {
    pub fn from_segment(header: &SegmentHeader, name: &str) -> ClusterRecord {
        ClusterRecord {
            system_identifier: header.system_identifier.to_string(),
            wal_segment_size: header.segment_size,
            wal_page_magic: Some(header.magic),
            learned_from: format!("wal-push of {name}"),
            learned_at: chrono::Utc::now(),
        }
    }

    /// What makes a segment with `header` not this cluster's WAL, if anything.
    pub fn mismatch(&self, header: &SegmentHeader) -> Option<String> {
        if self.system_identifier != header.system_identifier.to_string() {
            return Some(format!(
                "it was written by the cluster with system identifier {}, and this job archives the cluster {} (learned from {})",
                header.system_identifier, self.system_identifier, self.learned_from
            ));
        }
        if self.wal_segment_size != header.segment_size {
            return Some(format!(
                "its segments are {} bytes, and this job's cluster writes segments of {} bytes",
                header.segment_size, self.wal_segment_size
            ));
        }
        match self.wal_page_magic {
            Some(magic) if magic != header.magic => Some(format!(
                "it is WAL of {} (page magic 0x{:04X}), and this job's cluster writes WAL of {} (0x{magic:04X})",
                describe_release(header.magic),
                header.magic,
                describe_release(magic)
            )),
            _ => None,
        }
    }
}

fn describe_release(magic: u16) -> String {
    match major_of_page_magic(magic) {
        Some(major) => format!("PostgreSQL {major}"),
        None => "a PostgreSQL release lifeboat does not know".to_string(),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    #[test]
    fn a_history_names_its_ancestors_in_rising_order() {
        assert_eq!(
            check_history(3, b"# comment\n\n1 0/3000000 reason\n2\t1/0\tx\n").unwrap(),
            [(1, Lsn(0x3000000)), (2, Lsn(1 << 32))]
        );
        for (timeline, bad, why) in [
            (1, &b"1 0/3 x\n"[..], "timeline 1 has no history"),
            (2, b"", "names no ancestor"),
            (2, b"1 nonsense\n", "line 1 is not"),
            (3, b"2 0/5 x\n1 0/6 y\n", "line 2 goes back"),
            (3, b"1 0/6 x\n2 0/5 y\n", "line 2 goes back"),
            (4, b"1 0/6 x\n5 0/7 y\n", "timeline 5, which is no ancestor"),
            (2, &[0xff, 0xfe][..], "not text"),
        ] {
            let problem = check_history(timeline, bad).unwrap_err();
            assert!(problem.contains(why), "{problem}");
        }
    }

    /// A long page header as PostgreSQL 15 writes it, then `size` bytes in all.
    pub(crate) fn segment_bytes(timeline: u32, segment: u64, system: u64, size: usize) -> Vec<u8> {
        let mut bytes = vec![0u8; size];
        let mb16 = 16u32 << 20;
        let header = [
            &0xD110u16.to_le_bytes()[..],
            &LONG_HEADER_FLAG.to_le_bytes(),
            &timeline.to_le_bytes(),
            &(segment * u64::from(mb16)).to_le_bytes(),
            &0u32.to_le_bytes(),
            &[0; 4],
            &system.to_le_bytes(),
            &mb16.to_le_bytes(),
            &8192u32.to_le_bytes(),
        ]
        .concat();
        let n = header.len().min(size);
        bytes[..n].copy_from_slice(&header[..n]);
        for (index, page) in bytes.chunks_mut(8192).enumerate().skip(1) {
            let address = segment * u64::from(mb16) + index as u64 * 8192;
            let short = [
                &0xD110u16.to_le_bytes()[..],
                &0u16.to_le_bytes(),
                &timeline.to_le_bytes(),
                &address.to_le_bytes(),
            ]
            .concat();
            let n = short.len().min(page.len());
            page[..n].copy_from_slice(&short[..n]);
        }
        bytes
    }

    #[test]
    fn a_segment_must_be_what_its_name_says() {
        let mb16 = 16 << 20;
        let file = |name: &str| WalFile::parse(name).unwrap();
        let name = "000000010000000000000006";
        let good = segment_bytes(1, 6, 42, mb16);
        let header = check_segment(&file(name), &good).unwrap();
        assert_eq!((header.system_identifier, header.magic), (42, 0xD110));
        assert_eq!(major_of_page_magic(header.magic), Some(15));
        assert_eq!(page_magic_of(15), Some(0xD110));

        let refused = |bytes: &[u8], name: &str| check_segment(&file(name), bytes).unwrap_err();
        assert!(refused(&[], name).contains("0 bytes long, too short"));
        assert!(refused(&good[..8 << 20], name).contains("cut short"));
        assert!(refused(&vec![0x5a; mb16], name).contains("magic 0x5A5A"));
        assert!(
            refused(&good, "000000010000000000000010").contains("segment 000000010000000000000006")
        );
        // The first segment of timeline 2 starts as a copy of timeline 1's: allowed. A
        // later timeline in the header than in the name is not.
        check_segment(&file("000000020000000000000006"), &good).unwrap();
        let tl3 = segment_bytes(3, 6, 42, mb16);
        assert!(refused(&tl3, "000000020000000000000006").contains("timeline 3"));
        // A .partial file may be shorter than a segment, never longer.
        check_segment(&file("000000010000000000000006.partial"), &good[..1 << 20]).unwrap();
        let mut long = good.clone();
        long.push(0);
        assert!(refused(&long, "000000010000000000000006.partial").contains("more than"));
        let mut short_header = good.clone();
        short_header[2] = 0;
        assert!(refused(&short_header, name).contains("long header"));
        // A first page that is right does not vouch for the rest.
        let mut damaged = good.clone();
        damaged[3 * 8192..4 * 8192].fill(0x77);
        assert!(
            refused(&damaged, name)
                .contains("its page at byte 24576 (WAL 0/6006000) has magic 0x7777")
        );
        let mut stale = good.clone();
        stale[5 * 8192 + 8..5 * 8192 + 16].copy_from_slice(&(3u64 << 24).to_le_bytes());
        assert!(refused(&stale, name).contains("says it is at 0/3000000"));
        // Zeros to the end are what a WAL switch leaves; anything after them is damage.
        let mut switched = good.clone();
        switched[4 * 8192..].fill(0);
        check_segment(&file(name), &switched).unwrap();
        switched[7 * 8192 + 100] = 1;
        assert!(refused(&switched, name).contains("data at byte 57444"));
        // A .partial file's pages after its end are whatever the recycled file held.
        let mut partial = good.clone();
        partial[9 * 8192..].fill(0x33);
        check_segment(&file("000000010000000000000006.partial"), &partial).unwrap();
        assert!(refused(&partial, name).contains("byte 73728"));
        let mut odd_size = good.clone();
        odd_size[32..36].copy_from_slice(&(3u32 << 20).to_le_bytes());
        assert!(refused(&odd_size, name).contains("segment size of 3145728"));
    }

    #[test]
    fn a_segment_checked_piece_by_piece_gets_the_verdict_it_gets_whole() {
        let mb16 = 16 << 20;
        let name = "000000010000000000000006";
        let partial_name = "000000010000000000000006.partial";
        let good = segment_bytes(1, 6, 42, mb16);
        let mut damaged = good.clone();
        damaged[3 * 8192..4 * 8192].fill(0x77);
        let mut switched = good.clone();
        switched[4 * 8192..].fill(0);
        let mut switched_then_data = switched.clone();
        switched_then_data[7 * 8192 + 100] = 1;
        let mut recycled_tail = good.clone();
        recycled_tail[9 * 8192..].fill(0x33);
        let mut long = good.clone();
        long.push(0);
        let mut last_page_short = good[..5 * 8192 + 30].to_vec();
        last_page_short[5 * 8192 + 9] = 0x55;
        let mut far_address = good[..4 * 8192].to_vec();
        far_address[8..16].copy_from_slice(&(u64::MAX - 100).to_le_bytes());
        let cases: Vec<(&str, &[u8])> = vec![
            (name, &far_address),
            (name, &[]),
            (name, &good[..20]),
            (name, &good),
            (name, &good[..8 << 20]),
            ("000000010000000000000010", &good),
            (name, &damaged),
            (name, &switched),
            (name, &switched_then_data),
            (name, &recycled_tail),
            (partial_name, &recycled_tail),
            (partial_name, &long),
            (partial_name, &good[..1 << 20]),
            (partial_name, &last_page_short),
            (partial_name, &good[..5 * 8192 + 10]),
        ];
        for (name, bytes) in cases {
            let file = WalFile::parse(name).unwrap();
            let whole = format!("{:?}", check_segment(&file, bytes));
            for piece in [7, 40, 41, 8191, 8192, 8193, 100_000, 1 << 20] {
                let mut check = SegmentCheck::new(&file);
                for chunk in bytes.chunks(piece) {
                    check.feed(chunk);
                }
                let pieces = format!("{:?}", check.finish());
                assert_eq!(
                    pieces,
                    whole,
                    "{name}, {} bytes in pieces of {piece}",
                    bytes.len()
                );
            }
        }
    }

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
