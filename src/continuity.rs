//! How far the WAL archive carries a physical backup: which segments the repositories hold,
//! the timeline path recovery follows (history files), and the newest point reachable
//! without a gap. PostgreSQL takes the first segment `restore_command` cannot deliver for
//! the end of the archive and promotes there, so a missing segment with later ones behind it
//! would end a restore early in silence; this is how a restore, and `status`, know first.

use std::collections::{BTreeMap, BTreeSet};

use chrono::{DateTime, Utc};

use crate::error::{Error, ErrorKind, Result};
use crate::layout;
use crate::manifest::Manifest;
use crate::repository::Repository;
use crate::storage::{self, ObjectMeta};
use crate::wal::{self, Lsn, WalFile, WalFileKind};

/// WAL keys listed at a time.
pub const PAGE: usize = 10_000;

/// The WAL files of one job that any of a set of repositories holds.
#[derive(Debug, Default)]
pub struct ArchiveListing {
    /// (timeline, segment number) → when it was first stored, where the stores say.
    segments: BTreeMap<(u32, u64), Option<DateTime<Utc>>>,
    histories: BTreeSet<u32>,
    /// Repositories that could not be listed, with the cause: they may hold what the others
    /// lack.
    pub unreachable: Vec<(String, String)>,
}

impl ArchiveListing {
    /// Lists the WAL of `job` in every repository of `repositories`, paged.
    pub async fn list(repositories: &[Repository], job: &str, segment_size: u64) -> ArchiveListing {
        let mut listing = ArchiveListing::default();
        let prefix = layout::wal_prefix(job);
        for repository in repositories {
            let listed = storage::for_each_page(
                repository.store.as_ref(),
                &prefix,
                PAGE,
                async |page: Vec<ObjectMeta>| {
                    for object in page {
                        if let Some(file) = layout::wal_file_of_key(job, &object.key) {
                            listing.add(&file, segment_size, object.last_modified);
                        }
                    }
                },
            )
            .await;
            if let Err(e) = listed {
                listing.unreachable.push((
                    repository.name.clone(),
                    repository
                        .error(&format!("list the WAL archive of job '{job}'"), e)
                        .chain()
                        .join(": "),
                ));
            }
        }
        listing
    }

    pub fn add(&mut self, file: &WalFile, segment_size: u64, stored_at: Option<DateTime<Utc>>) {
        match file.kind {
            WalFileKind::Segment => {
                if let Some(segment) = file.segment(segment_size) {
                    let at = self.segments.entry((file.timeline, segment)).or_default();
                    *at = match (*at, stored_at) {
                        (Some(a), Some(b)) => Some(a.min(b)),
                        (a, b) => a.or(b),
                    };
                }
            }
            WalFileKind::History => {
                self.histories.insert(file.timeline);
            }
            WalFileKind::BackupLabel | WalFileKind::Partial => {}
        }
    }

    pub fn stored(&self, timeline: u32, segment: u64) -> Option<Option<DateTime<Utc>>> {
        self.segments.get(&(timeline, segment)).copied()
    }

    /// Every segment listed: (timeline, segment number) and when it was stored, in order.
    pub fn segments(&self) -> impl Iterator<Item = ((u32, u64), Option<DateTime<Utc>>)> + '_ {
        self.segments.iter().map(|(at, stored)| (*at, *stored))
    }

    pub fn holds_history(&self, timeline: u32) -> bool {
        self.histories.contains(&timeline)
    }

    /// The newest timeline PostgreSQL's `recovery_target_timeline = 'latest'` finds from
    /// `from`: it probes `from + 1`, `from + 2`, … while a history file is archived.
    pub fn latest_timeline(&self, from: u32) -> u32 {
        let mut newest = from;
        while let Some(next) = newest.checked_add(1)
            && self.histories.contains(&next)
        {
            newest = next;
        }
        newest
    }
}

/// One timeline on the way recovery goes: from the segment it begins in (0 for the first)
/// to the point it branched off into the next, if it did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Span {
    pub timeline: u32,
    pub begins: u64,
    pub switched_at: Option<Lsn>,
}

/// The path from `from` (the backup's timeline) to `to`, given `to`'s history: the
/// timelines recovery replays and where each takes over. None when `to` does not descend
/// from `from`, or branched off it before `floor` (the backup's stop: recovery cannot
/// follow a branch it has passed).
pub fn path_from_history(
    history: &[(u32, Lsn)],
    from: u32,
    to: u32,
    floor: Lsn,
    segment_size: u64,
) -> Option<Vec<Span>> {
    if from == to {
        return Some(vec![Span {
            timeline: from,
            begins: 0,
            switched_at: None,
        }]);
    }
    let start = history.iter().position(|(timeline, _)| *timeline == from)?;
    if history[start].1 < floor {
        return None;
    }
    let mut path = Vec::new();
    let mut begins = 0;
    for (timeline, switched_at) in &history[start..] {
        path.push(Span {
            timeline: *timeline,
            begins,
            switched_at: Some(*switched_at),
        });
        begins = wal::segment_of(*switched_at, segment_size);
    }
    path.push(Span {
        timeline: to,
        begins,
        switched_at: None,
    });
    Some(path)
}

/// The most a timeline history file holds, stored or decoded: a line per ancestor timeline.
pub const HISTORY_LIMIT: u64 = 1 << 20;

/// Reads the history file of `timeline` from the first repository that holds a readable
/// copy.
pub async fn read_history(
    repositories: &[Repository],
    job: &str,
    timeline: u32,
) -> Result<Vec<(u32, Lsn)>> {
    let name = format!("{timeline:08X}.history");
    let file = WalFile::parse(&name).expect("history names are valid");
    let mut problems = Vec::new();
    for repository in repositories {
        for key in layout::wal_keys(job, &file, false) {
            let stored = match storage::get_range_bytes(
                repository.store.as_ref(),
                &key,
                Some(0..HISTORY_LIMIT + 1),
            )
            .await
            {
                Ok(stored) => stored,
                Err(e) if e.is_not_found() => continue,
                Err(e) => {
                    problems.push(repository.error(&format!("read '{key}'"), e));
                    continue;
                }
            };
            let entries = match stored.len() as u64 > HISTORY_LIMIT {
                true => Err(format!("it is stored in more than {HISTORY_LIMIT} bytes")),
                false => wal::decode_limited(&stored[..], HISTORY_LIMIT),
            }
            .and_then(|raw| wal::check_history(timeline, &raw));
            match entries {
                Ok(entries) => return Ok(entries),
                Err(problem) => problems.push(Error::new(
                    ErrorKind::Verification,
                    format!(
                        "the timeline history file '{key}' in repository '{}' is no history: {problem}",
                        repository.name
                    ),
                )),
            }
        }
    }
    let mut error = Error::new(
        ErrorKind::Storage,
        format!(
            "unable to read the history of timeline {timeline} of job '{job}' from any repository"
        ),
    );
    for problem in problems {
        error = error.with_hint(problem.chain().join(": "));
    }
    Err(error)
}

/// A WAL segment of the archive, with when it was stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Point {
    pub name: String,
    pub segment: u64,
    pub stored_at: Option<DateTime<Utc>>,
}

/// How far the archive carries a backup along a timeline path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reach {
    pub segment_size: u64,
    /// The last segment of an unbroken run from the backup's first: recovery reaches its
    /// end. None when even the first is missing.
    pub gap_free_end: Option<Point>,
    /// The segment after it, which no repository holds.
    pub first_missing: String,
    /// The first segment archived after the missing one: set only when there is a gap, that
    /// is, when the archive goes on past it.
    pub resumes_at: Option<Point>,
    /// The newest segment archived on the path, past the gap or not.
    pub newest: Option<Point>,
    /// A timeline later than the one recovery ends on whose WAL is archived: its history
    /// file (or one before it) is missing, so `latest` cannot find it. Its first segment.
    pub unfollowed: Option<String>,
}

impl Reach {
    /// The WAL archived after a gap, which recovery cannot reach: "A (stored T) to B
    /// (stored U)", or one segment.
    pub fn lost_range(&self) -> Option<String> {
        let resumes = self.resumes_at.as_ref()?;
        let newest = self.newest.as_ref().unwrap_or(resumes);
        if newest.segment == resumes.segment {
            return Some(format!(
                "{} (stored {})",
                resumes.name,
                describe_time(resumes.stored_at)
            ));
        }
        Some(format!(
            "{} (stored {}) to {} (stored {})",
            resumes.name,
            describe_time(resumes.stored_at),
            newest.name,
            describe_time(newest.stored_at)
        ))
    }

    /// The end of the last segment recovery can replay.
    pub fn end_lsn(&self) -> Option<Lsn> {
        self.gap_free_end
            .as_ref()
            .map(|point| Lsn((point.segment + 1) * self.segment_size))
    }
}

pub fn describe_time(at: Option<DateTime<Utc>>) -> String {
    at.map_or_else(|| "at an unknown time".to_string(), |at| at.to_rfc3339())
}

/// The timeline segment `segment` must come from on `path`: the newest that has begun by
/// then.
pub fn timeline_at(path: &[Span], segment: u64) -> u32 {
    path.iter()
        .rev()
        .find(|span| span.begins <= segment)
        .map_or(path[0].timeline, |span| span.timeline)
}

/// Walks the archive along `path` from segment `first`: which timeline each segment must
/// come from (the newest on the path that has begun by then), how far it runs unbroken,
/// and what lies beyond.
pub fn reach(listing: &ArchiveListing, path: &[Span], first: u64, segment_size: u64) -> Reach {
    let timeline_of = |segment: u64| timeline_at(path, segment);
    let point = |segment: u64, stored_at| Point {
        name: wal::segment_name(timeline_of(segment), segment, segment_size),
        segment,
        stored_at,
    };
    let mut next = first;
    let mut gap_free_end = None;
    while let Some(stored_at) = listing.stored(timeline_of(next), next) {
        gap_free_end = Some(point(next, stored_at));
        next += 1;
    }
    let on_path = listing
        .segments
        .range((path[0].timeline, next)..)
        .filter(|((timeline, segment), _)| *segment > next && timeline_of(*segment) == *timeline)
        .map(|((_, segment), stored_at)| point(*segment, *stored_at));
    let (mut resumes_at, mut newest) = (None, None);
    for found in on_path {
        if resumes_at
            .as_ref()
            .is_none_or(|r: &Point| found.segment < r.segment)
        {
            resumes_at = Some(found.clone());
        }
        if newest
            .as_ref()
            .is_none_or(|n: &Point| found.segment > n.segment)
        {
            newest = Some(found);
        }
    }
    let last = path.last().map_or(0, |span| span.timeline);
    let unfollowed = listing
        .segments
        .keys()
        .find(|(timeline, _)| *timeline > last)
        .map(|(timeline, segment)| wal::segment_name(*timeline, *segment, segment_size));
    Reach {
        segment_size,
        newest: newest.or_else(|| gap_free_end.clone()),
        gap_free_end,
        first_missing: point(next, None).name,
        resumes_at,
        unfollowed,
    }
}

/// The timeline recovery follows: `recovery_target_timeline`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TimelineChoice {
    /// The newest timeline archived (PostgreSQL's default).
    #[default]
    Latest,
    /// The backup's own timeline, ignoring branches after it.
    Current,
    Numbered(u32),
}

impl TimelineChoice {
    /// As `recovery_target_timeline` takes it.
    pub fn setting(&self) -> String {
        match self {
            TimelineChoice::Latest => "latest".to_string(),
            TimelineChoice::Current => "current".to_string(),
            TimelineChoice::Numbered(timeline) => timeline.to_string(),
        }
    }

    /// The timeline recovery of a backup on `from` ends on, as PostgreSQL picks it.
    pub fn resolve(&self, listing: &ArchiveListing, from: u32) -> u32 {
        match self {
            TimelineChoice::Latest => listing.latest_timeline(from),
            TimelineChoice::Current => from,
            TimelineChoice::Numbered(timeline) => *timeline,
        }
    }
}

/// The timeline path from a backup on `timeline` that stopped at `stop` to the timeline
/// `choice` names; None when that timeline does not lead on from the backup: it is not a
/// descendant, or it branched off before the backup stopped (the backup was taken on a
/// timeline another had already left: PostgreSQL refuses it as "not a child of this
/// server's history").
pub async fn path_for(
    repositories: &[Repository],
    job: &str,
    listing: &ArchiveListing,
    (timeline, stop): (u32, Lsn),
    choice: TimelineChoice,
    segment_size: u64,
) -> Result<Option<Vec<Span>>> {
    let to = choice.resolve(listing, timeline);
    if to == timeline {
        return Ok(Some(vec![Span {
            timeline,
            begins: 0,
            switched_at: None,
        }]));
    }
    if to < timeline {
        return Ok(None);
    }
    let history = read_history(repositories, job, to).await?;
    Ok(path_from_history(
        &history,
        timeline,
        to,
        stop,
        segment_size,
    ))
}

/// A later timeline that branched off `timeline` before `position`, and where: then a
/// server (or a backup) on `timeline` at `position` is an old primary that kept writing
/// after a failover, split brain. Reads the history files only.
pub async fn branched_off(
    repositories: &[Repository],
    job: &str,
    (timeline, position): (u32, Lsn),
) -> Result<Option<(u32, Lsn)>> {
    let mut histories = ArchiveListing::default();
    for repository in repositories {
        // Probed as PostgreSQL probes them, one history file after the next: no listing.
        let mut next = timeline + 1;
        loop {
            let file = WalFile::parse(&format!("{next:08X}.history")).expect("valid name");
            let key = layout::wal_key(job, &file, false);
            match repository.store.head(&key).await {
                Ok(_) => {
                    histories.histories.insert(next);
                    next += 1;
                }
                Err(e) if e.is_not_found() => break,
                Err(e) => {
                    return Err(repository.error(&format!("look up '{key}'"), e));
                }
            }
        }
    }
    let latest = histories.latest_timeline(timeline);
    if latest == timeline {
        return Ok(None);
    }
    let history = read_history(repositories, job, latest).await?;
    Ok(history
        .iter()
        .find(|(ancestor, _)| *ancestor == timeline)
        .filter(|(_, switched_at)| *switched_at < position)
        .map(|(_, switched_at)| (latest, *switched_at)))
}

/// What a restore of a backup from `first` (on `timeline`, stopping at `stop`) can reach
/// in `repositories`, following the timeline `choice` as PostgreSQL will; from `listed`
/// when the archive was listed already.
pub async fn reach_of_backup(
    repositories: &[Repository],
    job: &str,
    (timeline, first, stop): (u32, u64, Lsn),
    choice: TimelineChoice,
    (segment_size, listed): (u64, Option<ArchiveListing>),
) -> Result<(Reach, ArchiveListing)> {
    let listing = match listed {
        Some(listing) => listing,
        None => ArchiveListing::list(repositories, job, segment_size).await,
    };
    let Some(path) = path_for(
        repositories,
        job,
        &listing,
        (timeline, stop),
        choice,
        segment_size,
    )
    .await?
    else {
        let to = choice.resolve(&listing, timeline);
        return Err(Error::new(
            ErrorKind::Verification,
            format!(
                "timeline {to} of job '{job}' does not lead on from this backup (timeline {timeline}, stopped at {stop}): split brain, the backup was taken on a timeline another had already branched off (an old primary kept running after a failover), or the timeline asked for does not descend from it; PostgreSQL would refuse it as \"not a child of this server's history\""
            ),
        )
        .with_hint("pick a backup on the timeline's path with --backup, or say which timeline with --timeline; back up the cluster that is the primary now"));
    };
    Ok((reach(&listing, &path, first, segment_size), listing))
}

/// What a restore of the physical backup `manifest` can reach in `repositories` (from
/// `listed`, when listed already): None for a manifest that does not record its WAL range;
/// also the segment the backup needs last.
pub async fn reach_of_manifest(
    repositories: &[Repository],
    manifest: &Manifest,
    choice: TimelineChoice,
    listed: Option<ArchiveListing>,
) -> Result<Option<(Reach, ArchiveListing, u64)>> {
    let source = &manifest.source;
    let (Some(timeline), Some(first), Some(last), Some(stop), Some(segment_size)) = (
        source.timeline,
        source.first_wal.as_deref().and_then(WalFile::parse),
        source.last_wal.as_deref().and_then(WalFile::parse),
        source.stop_lsn.as_deref().and_then(Lsn::parse),
        source.wal_segment_size,
    ) else {
        return Ok(None);
    };
    let (Some(first), Some(last)) = (first.segment(segment_size), last.segment(segment_size))
    else {
        return Err(Error::new(
            ErrorKind::Verification,
            format!(
                "backup '{}/{}' records a WAL range that does not fit its segment size",
                manifest.job, manifest.id
            ),
        ));
    };
    let (reach, listing) = reach_of_backup(
        repositories,
        &manifest.job,
        (timeline, first, stop),
        choice,
        (segment_size, listed),
    )
    .await?;
    Ok(Some((reach, listing, last)))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MB16: u64 = 16 << 20;

    fn listing(files: &[&str]) -> ArchiveListing {
        let mut listing = ArchiveListing::default();
        for (index, name) in files.iter().enumerate() {
            let at = DateTime::from_timestamp(1_800_000_000 + index as i64 * 60, 0);
            listing.add(&WalFile::parse(name).unwrap(), MB16, at);
        }
        listing
    }

    fn one_timeline(timeline: u32) -> Vec<Span> {
        vec![Span {
            timeline,
            begins: 0,
            switched_at: None,
        }]
    }

    #[test]
    fn a_missing_segment_with_later_ones_is_a_gap_and_the_end_is_not() {
        let archive = listing(&[
            "000000010000000000000003",
            "000000010000000000000004",
            "000000010000000000000005",
            "000000010000000000000007",
            "000000010000000000000008",
        ]);
        let reach = reach(&archive, &one_timeline(1), 3, MB16);
        assert_eq!(reach.gap_free_end.as_ref().unwrap().segment, 5);
        assert_eq!(reach.first_missing, "000000010000000000000006");
        assert_eq!(reach.resumes_at.as_ref().unwrap().segment, 7);
        assert_eq!(reach.newest.as_ref().unwrap().segment, 8);
        assert_eq!(reach.end_lsn(), Some(Lsn(6 * MB16)));
        assert!(
            reach
                .lost_range()
                .unwrap()
                .starts_with("000000010000000000000007 (stored ")
        );

        let whole = listing(&["000000010000000000000003", "000000010000000000000004"]);
        let reach = super::reach(&whole, &one_timeline(1), 3, MB16);
        assert_eq!(reach.gap_free_end.as_ref().unwrap().segment, 4);
        assert_eq!(reach.lost_range(), None);
        assert_eq!(reach.resumes_at, None);
        assert_eq!(reach.newest.unwrap().segment, 4);
    }

    #[test]
    fn each_segment_comes_from_the_timeline_that_has_begun_by_then() {
        // Timeline 2 branched off 1 in segment 5: from there on, 1's segments are another
        // history and do not count.
        let history =
            wal::check_history(2, b"1\t0/5000100\tno recovery target specified\n").unwrap();
        assert_eq!(history, [(1, Lsn(0x5000100))]);
        let path = path_from_history(&history, 1, 2, Lsn(0x3000000), MB16).unwrap();
        assert_eq!(path[1].begins, 5);
        let archive = listing(&[
            "000000010000000000000003",
            "000000010000000000000004",
            "000000010000000000000005",
            "000000010000000000000006",
            "000000020000000000000005",
            "000000020000000000000007",
        ]);
        let reach = reach(&archive, &path, 3, MB16);
        assert_eq!(reach.gap_free_end.unwrap().name, "000000020000000000000005");
        assert_eq!(reach.first_missing, "000000020000000000000006");
        assert_eq!(reach.unfollowed, None);
        assert_eq!(reach.resumes_at.unwrap().name, "000000020000000000000007");
        // A backup that stopped after the branch cannot follow it.
        assert_eq!(
            path_from_history(&history, 1, 2, Lsn(0x6000000), MB16),
            None
        );
        // Nor can one of a timeline the history does not name.
        assert_eq!(path_from_history(&history, 3, 2, Lsn(0), MB16), None);
    }

    #[test]
    fn latest_follows_consecutive_history_files_as_postgres_does() {
        let archive = listing(&["00000002.history", "00000003.history", "00000005.history"]);
        assert_eq!(archive.latest_timeline(1), 3);
        assert_eq!(archive.latest_timeline(3), 3);
        assert_eq!(archive.latest_timeline(4), 5);
    }
}
