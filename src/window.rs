//! What each repository can restore a job to, judged by what it holds itself: the earliest
//! and latest restorable point, and the gaps between. Logical, files and Redis jobs restore
//! to their complete backups, from the oldest to the newest. A physical job restores to any
//! moment from the oldest complete base backup's consistent point to the end of the newest
//! WAL reachable without a gap; a missing segment cuts out the moments from the WAL before
//! it to the next base backup that starts after it, and a missing timeline history file
//! cuts off the timeline it describes. A region is judged alone because it may be the only
//! one left: what another holds does not fill its gaps.
//!
//! The record of what `verify --archive` last proved of a repository's archive lives in
//! that repository (`jobs/JOB/archive-proof.json`), signed where the host holds a signing
//! key, so that a nightly run reads only what is new and `status` says when it was proven.

use std::collections::BTreeMap;

use bytes::Bytes;
use chrono::{DateTime, Utc};
use futures::StreamExt;
use serde::{Deserialize, Serialize};

use crate::continuity::{self, ArchiveListing, Span};
use crate::error::{Error, ErrorKind, Result};
use crate::inventory::{self, MANIFESTS_IN_FLIGHT, Presence};
use crate::layout::{self, BackupKind};
use crate::manifest::Manifest;
use crate::repository::Repository;
use crate::storage::{self, ObjectMeta};
use crate::wal::{self, Lsn, WalFile};

/// The segment size assumed for listing an archive no backup describes.
const DEFAULT_SEGMENT_SIZE: u64 = 16 << 20;
/// The largest proof record read: about 60 bytes a file, so a million WAL files.
const PROOF_LIMIT: u64 = 64 << 20;

/// A run of missing WAL, or a missing timeline history, and the moments it makes
/// impossible to recover to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Gap {
    /// The first and last missing segment, or the history file's name (both the same).
    pub first_missing: String,
    pub last_missing: String,
    /// How many segments are missing; 0 for a history file.
    pub segments: u64,
    /// Recovery to a moment after this one (the end of the WAL before the gap) is impossible
    /// here; None when even the oldest backup's first segment is missing.
    pub lost_from: Option<DateTime<Utc>>,
    /// ...until this one: the consistent point of the first base backup after the gap. None:
    /// no backup starts after it, so nothing past the gap restores until a new one is taken.
    pub lost_to: Option<DateTime<Utc>>,
    /// Backups that need WAL in the gap to become consistent: they do not restore here.
    pub backups_broken: Vec<String>,
    /// A history file that is there but does not read, and why: as good as missing.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unreadable: Option<String>,
}

impl Gap {
    /// "segment A is missing (…): point-in-time recovery from T to U is impossible in
    /// repository 'r'".
    pub fn describe(&self, repository: &str) -> String {
        let what = match (self.segments, &self.unreadable) {
            (0, Some(why)) => format!(
                "timeline history file {} does not read ({why})",
                self.first_missing
            ),
            (0, None) => format!("timeline history file {} is missing", self.first_missing),
            (1, _) => format!("WAL segment {} is missing", self.first_missing),
            (n, _) => format!(
                "WAL segments {} to {} are missing ({n} segments)",
                self.first_missing, self.last_missing
            ),
        };
        let from = self
            .lost_from
            .map_or_else(|| "its oldest backup".to_string(), human_time);
        let range = match self.lost_to {
            Some(to) => format!("from {from} to {}", human_time(to)),
            None => format!("from {from} on (until a new base backup)"),
        };
        let mut text = format!(
            "{what}: point-in-time recovery {range} is impossible in repository '{repository}'"
        );
        if !self.backups_broken.is_empty() {
            text.push_str(&format!(
                "; backup(s) {} do not restore from it at all",
                self.backups_broken.join(", ")
            ));
        }
        text
    }
}

pub fn human_time(at: DateTime<Utc>) -> String {
    at.format("%Y-%m-%d %H:%M:%S UTC").to_string()
}

/// What one repository restores a job to.
#[derive(Debug, Clone, Serialize)]
pub struct Window {
    pub repository: String,
    /// Complete backups the repository holds.
    pub backups: usize,
    pub earliest: Option<DateTime<Utc>>,
    pub latest: Option<DateTime<Utc>>,
    pub gaps: Vec<Gap>,
    /// What keeps part of the window from being judged: a backup off the timeline path, a
    /// history file that does not read.
    pub problems: Vec<String>,
    /// Physical jobs: WAL segments the repository holds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub segments: Option<usize>,
    /// Physical jobs: when `verify --archive` last found this archive continuous and intact.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub verified_at: Option<DateTime<Utc>>,
}

impl Window {
    fn empty(repository: &Repository) -> Window {
        Window {
            repository: repository.name.clone(),
            backups: 0,
            earliest: None,
            latest: None,
            gaps: Vec::new(),
            problems: Vec::new(),
            segments: None,
            verified_at: None,
        }
    }

    /// "window in 'r': T to U, 2 gap(s), archive verified T".
    pub fn summary(&self) -> String {
        let mut text = format!("window in '{}': ", self.repository);
        match (self.earliest, self.latest) {
            (Some(earliest), Some(latest)) => text.push_str(&format!(
                "{} to {}",
                human_time(earliest),
                human_time(latest)
            )),
            _ => text.push_str("nothing restorable"),
        }
        if !self.gaps.is_empty() {
            text.push_str(&format!(", {} gap(s)", self.gaps.len()));
        }
        match (self.segments, self.verified_at) {
            (Some(_), Some(at)) => text.push_str(&format!(", archive verified {}", human_time(at))),
            (Some(_), None) => {
                text.push_str(", archive never verified (`lifeboat verify --archive`)")
            }
            _ => {}
        }
        text
    }
}

/// A physical backup as the window needs it.
#[derive(Debug, Clone)]
pub struct BaseBackup {
    pub id: String,
    pub timeline: u32,
    pub first: u64,
    pub last: u64,
    pub stop: Lsn,
    pub consistent_at: DateTime<Utc>,
}

impl BaseBackup {
    /// None for a manifest that does not record its WAL range (made by an older lifeboat).
    pub fn of(manifest: &Manifest) -> Option<(BaseBackup, u64)> {
        let source = &manifest.source;
        let segment_size = source.wal_segment_size?;
        let first = WalFile::parse(source.first_wal.as_deref()?)?.segment(segment_size)?;
        let last = WalFile::parse(source.last_wal.as_deref()?)?.segment(segment_size)?;
        Some((
            BaseBackup {
                id: manifest.id.clone(),
                timeline: source.timeline?,
                first,
                last,
                stop: Lsn::parse(source.stop_lsn.as_deref()?)?,
                consistent_at: manifest.recovery_point,
            },
            segment_size,
        ))
    }
}

/// One archived WAL file as a repository lists it.
#[derive(Debug, Clone)]
pub struct ListedFile {
    pub key: String,
    pub file: WalFile,
    pub size: u64,
    pub stored_at: Option<DateTime<Utc>>,
}

/// A job's WAL archive in one repository.
#[derive(Debug, Default)]
pub struct RepositoryArchive {
    pub files: Vec<ListedFile>,
    pub listing: ArchiveListing,
    pub segment_size: u64,
}

impl RepositoryArchive {
    /// The archive without the files `drop` picks; None when it picks none.
    pub fn without(&self, drop: impl Fn(&ListedFile) -> bool) -> Option<RepositoryArchive> {
        if !self.files.iter().any(&drop) {
            return None;
        }
        let mut kept = RepositoryArchive {
            segment_size: self.segment_size,
            ..Default::default()
        };
        for listed in self.files.iter().filter(|listed| !drop(listed)) {
            kept.listing
                .add(&listed.file, kept.segment_size, listed.stored_at);
            kept.files.push(listed.clone());
        }
        Some(kept)
    }
}

/// Lists the WAL of `job` that `repository` holds, paged.
pub async fn list_archive(
    repository: &Repository,
    job: &str,
    segment_size: u64,
) -> Result<RepositoryArchive> {
    let mut archive = RepositoryArchive {
        segment_size,
        ..Default::default()
    };
    storage::for_each_page(
        repository.store.as_ref(),
        &layout::wal_prefix(job),
        continuity::PAGE,
        async |page: Vec<ObjectMeta>| {
            for object in page {
                if let Some(file) = layout::wal_file_of_key(job, &object.key) {
                    archive
                        .listing
                        .add(&file, segment_size, object.last_modified);
                    archive.files.push(ListedFile {
                        key: object.key,
                        file,
                        size: object.size,
                        stored_at: object.last_modified,
                    });
                }
            }
        },
    )
    .await
    .map_err(|e| repository.error(&format!("list the WAL archive of job '{job}'"), e))?;
    Ok(archive)
}

/// The complete backups `repository` holds of `job` (by its own manifests), oldest first.
pub async fn complete_backups(repository: &Repository, job: &str) -> Result<Vec<Manifest>> {
    let holdings = inventory::holdings(repository, job).await?;
    let ids: Vec<&String> = holdings
        .iter()
        .filter(|(_, holding)| holding.manifest)
        .map(|(id, _)| id)
        .collect();
    let manifests: Vec<Option<Manifest>> = futures::stream::iter(ids)
        .map(|id| inventory::own_manifest(repository, job, id))
        .buffered(MANIFESTS_IN_FLIGHT)
        .collect()
        .await;
    Ok(manifests
        .into_iter()
        .flatten()
        .filter(|manifest| {
            holdings
                .get(&manifest.id)
                .is_some_and(|holding| holding.presence(manifest) == Presence::Complete)
        })
        .collect())
}

/// The window of `job` in `repository`, and (physical jobs) its archive as listed.
pub async fn of_repository(
    repository: &Repository,
    job: &str,
    kind: BackupKind,
) -> Result<(Window, Option<RepositoryArchive>)> {
    of_repository_without(repository, job, kind, &[]).await
}

/// The window with the WAL files `unusable` (keys) taken for missing: copies `verify
/// --archive` found damaged or gone. Those its proof records as damaged, still stored as
/// they were found, count as missing too: recovery stops at them as at a gap.
pub async fn of_repository_without(
    repository: &Repository,
    job: &str,
    kind: BackupKind,
    unusable: &[String],
) -> Result<(Window, Option<RepositoryArchive>)> {
    let manifests = complete_backups(repository, job).await?;
    let mut window = Window::empty(repository);
    window.backups = manifests.len();
    if kind != BackupKind::PostgresPhysical {
        window.earliest = manifests.iter().map(|m| m.recovery_point).min();
        window.latest = manifests.iter().map(|m| m.recovery_point).max();
        return Ok((window, None));
    }
    let mut backups = Vec::new();
    let mut segment_size = None;
    for manifest in &manifests {
        match BaseBackup::of(manifest) {
            Some((backup, size)) => {
                segment_size.get_or_insert(size);
                backups.push(backup);
            }
            None => window.problems.push(format!(
                "backup {} does not record the WAL it needs, so the window is judged without it",
                manifest.id
            )),
        }
    }
    let listed = list_archive(
        repository,
        job,
        segment_size.unwrap_or(DEFAULT_SEGMENT_SIZE),
    )
    .await?;
    let proof = read_proof(repository, job).await.ok().flatten();
    // The window is judged without the unusable copies; the listing returned holds them,
    // for `verify --archive` to read again.
    let usable = listed.without(|listed| {
        unusable.contains(&listed.key) || proof.as_ref().is_some_and(|p| p.found_damaged(listed))
    });
    let archive = usable.as_ref().unwrap_or(&listed);
    window.segments = Some(archive.listing.segments().count());
    window.verified_at = proof
        .and_then(|proof| proof.verified_at)
        // A time ahead of this host's by more than any clock drifts is a planted one.
        .filter(|at| *at <= Utc::now() + chrono::Duration::hours(1));
    let Some(oldest_timeline) = backups.iter().map(|b| b.timeline).min() else {
        return Ok((window, Some(listed)));
    };
    let mut to = archive.listing.latest_timeline(oldest_timeline);
    let mut history = Vec::new();
    if to > oldest_timeline {
        match continuity::read_history(std::slice::from_ref(repository), job, to).await {
            Ok(read) => history = read,
            // As good as missing: recovery cannot follow the timeline it describes.
            Err(e) => {
                let why = std::iter::once(e.message().to_string())
                    .chain(e.hints().iter().cloned())
                    .collect::<Vec<_>>()
                    .join("; ");
                window.gaps.push(Gap {
                    first_missing: format!("{to:08X}.history"),
                    last_missing: format!("{to:08X}.history"),
                    segments: 0,
                    lost_from: archive
                        .listing
                        .segments()
                        .filter(|((timeline, _), _)| *timeline >= to)
                        .filter_map(|(_, stored)| stored)
                        .min(),
                    lost_to: None,
                    backups_broken: Vec::new(),
                    unreadable: Some(why),
                });
                to = oldest_timeline;
            }
        }
    }
    let unreadable_history = window.gaps.iter().any(|gap| gap.unreadable.is_some());
    physical_window(&mut window, archive, &backups, (&history, to));
    if unreadable_history {
        // The timelines from the unreadable history on are cut off by that gap already;
        // another "missing" history named past it would be invented.
        window
            .gaps
            .retain(|gap| gap.segments > 0 || gap.unreadable.is_some());
    }
    Ok((window, Some(listed)))
}

/// Fills `window` from the archive and the base backups, following the timelines to `to`
/// along `history` as `recovery_target_timeline = 'latest'` does.
pub fn physical_window(
    window: &mut Window,
    archive: &RepositoryArchive,
    backups: &[BaseBackup],
    (history, to): (&[(u32, Lsn)], u32),
) {
    let segment_size = archive.segment_size;
    let mut on_path: Vec<(&BaseBackup, Vec<Span>)> = Vec::new();
    for backup in backups {
        match continuity::path_from_history(history, backup.timeline, to, backup.stop, segment_size)
        {
            Some(path) => on_path.push((backup, path)),
            None => window.problems.push(format!(
                "backup {} (timeline {}) is not on the path to timeline {to}, which recovery follows: it restores only with --timeline {}",
                backup.id, backup.timeline, backup.timeline
            )),
        }
    }
    on_path.sort_by_key(|(backup, _)| (backup.first, backup.id.clone()));
    let Some((oldest, path)) = on_path.first() else {
        return;
    };
    let start = oldest.first;
    let mut present: Vec<(u64, Option<DateTime<Utc>>)> = archive
        .listing
        .segments()
        .filter(|((timeline, segment), _)| {
            *segment >= start && continuity::timeline_at(path, *segment) == *timeline
        })
        .map(|((_, segment), stored_at)| (segment, stored_at))
        .collect();
    present.sort_unstable_by_key(|(segment, _)| *segment);
    let stored_at = |segment: u64| {
        present
            .binary_search_by_key(&segment, |(s, _)| *s)
            .ok()
            .and_then(|index| present[index].1)
    };
    let name = |segment: u64| {
        wal::segment_name(
            continuity::timeline_at(path, segment),
            segment,
            segment_size,
        )
    };
    let mut expected = start;
    let mut holes: Vec<(u64, u64)> = Vec::new();
    for (segment, _) in &present {
        if *segment > expected {
            holes.push((expected, segment - 1));
        }
        expected = segment + 1;
    }
    // Past the end of the archive, nothing is a gap unless a backup needs it to become
    // consistent: then that backup does not restore.
    if let Some(needed) = on_path.iter().map(|(backup, _)| backup.last).max()
        && needed >= expected
    {
        holes.push((expected, needed));
    }
    let breaks = |backup: &BaseBackup| {
        holes
            .iter()
            .any(|(first, last)| backup.first <= *last && backup.last >= *first)
    };
    let restorable: Vec<&BaseBackup> = on_path
        .iter()
        .map(|(backup, _)| *backup)
        .filter(|backup| !breaks(backup))
        .collect();
    // Nothing was restorable before the first backup that restores.
    let window_start = restorable.iter().map(|b| b.consistent_at).min();
    for (first, last) in &holes {
        window.gaps.push(Gap {
            first_missing: name(*first),
            last_missing: name(*last),
            segments: (last - first).saturating_add(1),
            lost_from: (*first > start)
                .then(|| stored_at(first - 1))
                .flatten()
                .zip(window_start)
                .map(|(at, start)| at.max(start)),
            lost_to: restorable
                .iter()
                .filter(|backup| backup.first > *last)
                .map(|backup| backup.consistent_at)
                .min(),
            backups_broken: on_path
                .iter()
                .filter(|(backup, _)| backup.first <= *last && backup.last >= *first)
                .map(|(backup, _)| backup.id.clone())
                .collect(),
            unreadable: None,
        });
    }
    window.earliest = window_start;
    if let Some(newest) = restorable.iter().max_by_key(|b| (b.first, b.consistent_at)) {
        let end = match holes.iter().find(|(first, _)| *first > newest.last) {
            Some((first, _)) => stored_at(first - 1),
            None => present.last().and_then(|(_, at)| *at),
        };
        window.latest = Some(end.map_or(newest.consistent_at, |end| end.max(newest.consistent_at)));
    }
    // A later timeline whose history (or one before it) is missing: `latest` stops short.
    let unfollowed = archive
        .listing
        .segments()
        .filter(|((timeline, _), _)| *timeline > to);
    let (mut count, mut first_stored) = (0, None::<DateTime<Utc>>);
    for (_, stored) in unfollowed {
        count += 1;
        first_stored = match (first_stored, stored) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
    }
    let named = |name: &str| window.gaps.iter().any(|gap| gap.first_missing == name);
    if count > 0 && !named(&format!("{:08X}.history", to.saturating_add(1))) {
        let history = format!("{:08X}.history", to.saturating_add(1));
        window.gaps.push(Gap {
            first_missing: history.clone(),
            last_missing: history,
            segments: 0,
            lost_from: first_stored,
            lost_to: None,
            backups_broken: Vec::new(),
            unreadable: None,
        });
    }
}

/// What `verify --archive` proved of one repository's archive, kept in that repository.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ArchiveProof {
    pub format: u32,
    pub job: String,
    pub segment_size: u64,
    /// The last run that found the archive continuous and every file intact.
    pub verified_at: Option<DateTime<Utc>>,
    /// The last run, whole or not.
    pub checked_at: Option<DateTime<Utc>>,
    /// The last run that read every file (`--full`), or the first.
    pub full_at: Option<DateTime<Utc>>,
    /// Each proven file (its key below `jobs/JOB/wal/`) with its stored size and the time it
    /// was stored, in milliseconds, as the listing showed them when it was read (a file
    /// listed with another size or time was replaced since, and is read again), and whether
    /// what it holds was checked (an encrypted one read without a key was not).
    pub files: BTreeMap<String, (u64, i64, bool)>,
    /// Files found damaged, with their size and stored time then: until they are replaced,
    /// the window counts them missing.
    #[serde(default)]
    pub damaged: BTreeMap<String, (u64, i64)>,
}

/// A listed file as the proof names it (its timeline directory and stored name), with its
/// size and stored time.
fn proof_entry(listed: &ListedFile) -> (&str, (u64, i64)) {
    let mut slashes = listed.key.rmatch_indices('/').map(|(at, _)| at);
    let name = match (slashes.next(), slashes.next()) {
        (Some(_), Some(before)) => &listed.key[before + 1..],
        _ => listed.key.as_str(),
    };
    let stored = listed
        .stored_at
        .map_or(i64::MIN, |at| at.timestamp_millis());
    (name, (listed.size, stored))
}

impl ArchiveProof {
    /// Whether `listed` is a file this proof proved, unchanged since, and (when `content`)
    /// checked down to what it holds.
    pub fn holds(&self, listed: &ListedFile, content: bool) -> bool {
        let (name, entry) = proof_entry(listed);
        listed.stored_at.is_some()
            && self.files.get(name).is_some_and(|(size, stored, checked)| {
                (*size, *stored) == entry && (*checked || !content)
            })
    }

    /// Whether `listed` is a copy found damaged, not replaced since.
    pub fn found_damaged(&self, listed: &ListedFile) -> bool {
        let (name, entry) = proof_entry(listed);
        self.damaged.get(name) == Some(&entry)
    }

    /// Records `damaged` (listed files found damaged) as such.
    pub fn with_damaged(mut self, damaged: &[&ListedFile]) -> ArchiveProof {
        self.damaged = damaged
            .iter()
            .map(|listed| {
                let (name, entry) = proof_entry(listed);
                (name.to_string(), entry)
            })
            .collect();
        self
    }

    /// The record of exactly `proven`: listed files that checked out, now or before, and
    /// whether what each holds was checked.
    pub fn of(job: &str, segment_size: u64, proven: &[(&ListedFile, bool)]) -> ArchiveProof {
        ArchiveProof {
            format: 2,
            job: job.to_string(),
            segment_size,
            files: proven
                .iter()
                .map(|(listed, checked)| {
                    let (name, (size, stored)) = proof_entry(listed);
                    (name.to_string(), (size, stored, *checked))
                })
                .collect(),
            ..Default::default()
        }
    }
}

/// The proof record `repository` holds for `job`: None when there is none; an error when
/// it does not read, or (with `trusted_signers`) is not signed by a trusted key.
pub async fn read_proof(repository: &Repository, job: &str) -> Result<Option<ArchiveProof>> {
    let key = layout::archive_proof_key(job);
    let bytes =
        match storage::get_range_bytes(repository.store.as_ref(), &key, Some(0..PROOF_LIMIT)).await
        {
            Ok(bytes) => bytes,
            Err(e) if e.is_not_found() => return Ok(None),
            Err(e) => return Err(repository.error(&format!("read '{key}'"), e)),
        };
    if bytes.len() as u64 >= PROOF_LIMIT {
        return Err(Error::new(
            ErrorKind::Verification,
            format!(
                "the archive proof '{key}' in repository '{}' is not used: it is larger than {PROOF_LIMIT} bytes",
                repository.name
            ),
        ));
    }
    let untrusted = |why: String| {
        Error::new(
            ErrorKind::Verification,
            format!(
                "the archive proof '{key}' in repository '{}' is not used: {why}",
                repository.name
            ),
        )
    };
    if repository.trust.required() {
        let signature = repository.signature_of(&key).await?;
        repository
            .trust
            .check(&bytes, signature.as_deref(), &key)
            .map_err(|untrusted_because| untrusted(untrusted_because.to_string()))?;
    }
    if bytes.len() as u64 >= PROOF_LIMIT {
        return Err(untrusted(format!("it is larger than {PROOF_LIMIT} bytes")));
    }
    let proof: ArchiveProof =
        serde_json::from_slice(&bytes).map_err(|e| untrusted(e.to_string()))?;
    if proof.format != 2 || proof.job != job {
        return Err(untrusted(format!(
            "it is a record of format {} for job '{}'",
            proof.format, proof.job
        )));
    }
    Ok(Some(proof))
}

/// Replaces the proof record in `repository`, signed (signature first) when `signer` is
/// given.
pub async fn write_proof(
    repository: &Repository,
    proof: &ArchiveProof,
    signer: Option<&crate::signing::Signer>,
) -> Result<()> {
    let key = layout::archive_proof_key(&proof.job);
    let body = Bytes::from(serde_json::to_vec(proof).expect("the proof serializes"));
    if let Some(signer) = signer {
        let signature = crate::signing::signature_key(&key);
        storage::put_bytes(
            repository.store.as_ref(),
            &signature,
            Bytes::from(signer.sign(&body, &key)?),
        )
        .await
        .map_err(|e| repository.error(&format!("write signature '{signature}'"), e))?;
    }
    storage::put_bytes(repository.store.as_ref(), &key, body)
        .await
        .map(|_| ())
        .map_err(|e| repository.error(&format!("write '{key}'"), e))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MB16: u64 = 16 << 20;

    fn at(minute: i64) -> Option<DateTime<Utc>> {
        DateTime::from_timestamp(1_800_000_000 + minute * 60, 0)
    }

    fn archive_of(files: &[(&str, i64)]) -> RepositoryArchive {
        let mut archive = RepositoryArchive {
            segment_size: MB16,
            ..Default::default()
        };
        for (name, minute) in files {
            let file = WalFile::parse(name).unwrap();
            archive.listing.add(&file, MB16, at(*minute));
            archive.files.push(ListedFile {
                key: format!("jobs/j/wal/{:08X}/{name}.zst", file.timeline),
                file,
                size: 1,
                stored_at: at(*minute),
            });
        }
        archive
    }

    fn backup(id: &str, first: u64, last: u64, minute: i64) -> BaseBackup {
        BaseBackup {
            id: id.to_string(),
            timeline: 1,
            first,
            last,
            stop: Lsn(last * MB16 + 100),
            consistent_at: at(minute).unwrap(),
        }
    }

    fn segment(number: u64) -> String {
        wal::segment_name(1, number, MB16)
    }

    fn window_of(archive: &RepositoryArchive, backups: &[BaseBackup]) -> Window {
        let mut window = Window {
            repository: "r".into(),
            backups: backups.len(),
            earliest: None,
            latest: None,
            gaps: Vec::new(),
            problems: Vec::new(),
            segments: None,
            verified_at: None,
        };
        physical_window(&mut window, archive, backups, (&[], 1));
        window
    }

    #[test]
    fn a_gap_cuts_the_moments_from_the_wal_before_it_to_the_next_backup() {
        let names: Vec<String> = (2..=12)
            .filter(|n| *n != 6 && *n != 7)
            .map(segment)
            .collect();
        let files: Vec<(&str, i64)> = names.iter().map(|n| (n.as_str(), 0)).collect();
        let mut archive = archive_of(&files);
        // Stored one minute apart, segment n at minute n.
        archive.listing = ArchiveListing::default();
        for name in &names {
            let file = WalFile::parse(name).unwrap();
            let minute = file.segment(MB16).unwrap() as i64;
            archive.listing.add(&file, MB16, at(minute));
        }
        let backups = [backup("a", 2, 3, 3), backup("b", 9, 9, 9)];
        let window = window_of(&archive, &backups);
        assert_eq!(window.gaps.len(), 1, "{window:?}");
        let gap = &window.gaps[0];
        assert_eq!(gap.first_missing, segment(6));
        assert_eq!(gap.last_missing, segment(7));
        assert_eq!(gap.segments, 2);
        assert_eq!(gap.lost_from, at(5));
        assert_eq!(gap.lost_to, at(9));
        assert!(gap.backups_broken.is_empty());
        assert_eq!(window.earliest, at(3));
        assert_eq!(window.latest, at(12));
        assert!(
            gap.describe("dr").contains("point-in-time recovery from 2027-01-15 08:05:00 UTC to 2027-01-15 08:09:00 UTC is impossible in repository 'dr'"),
            "{}",
            gap.describe("dr")
        );

        // No backup after the gap: the window ends before it.
        let window = window_of(&archive, &backups[..1]);
        assert_eq!(window.gaps[0].lost_to, None);
        assert_eq!(window.latest, at(5));
        assert!(
            window.gaps[0]
                .describe("dr")
                .contains("on (until a new base backup)")
        );
    }

    #[test]
    fn a_backup_that_needs_missing_wal_is_broken_and_out_of_the_window() {
        let names: Vec<String> = [2, 3, 5, 6].into_iter().map(segment).collect();
        let files: Vec<(&str, i64)> = names.iter().map(|n| (n.as_str(), 1)).collect();
        let archive = archive_of(&files);
        let backups = [
            backup("a", 2, 2, 1),
            backup("b", 3, 4, 2),
            backup("c", 5, 5, 3),
        ];
        let window = window_of(&archive, &backups);
        assert_eq!(window.gaps[0].backups_broken, ["b"]);
        assert_eq!(window.earliest, at(1));
        // The whole archive: no gap is no finding.
        let whole: Vec<String> = (2..=6).map(segment).collect();
        let files: Vec<(&str, i64)> = whole.iter().map(|n| (n.as_str(), 1)).collect();
        assert!(window_of(&archive_of(&files), &backups).gaps.is_empty());
    }

    #[test]
    fn a_backup_whose_own_last_segments_are_missing_is_a_gap_at_the_end() {
        let names: Vec<String> = (2..=12).map(segment).collect();
        let files: Vec<(&str, i64)> = names.iter().map(|n| (n.as_str(), 1)).collect();
        let archive = archive_of(&files);
        let backups = [backup("a", 2, 3, 3), backup("b", 12, 14, 9)];
        let window = window_of(&archive, &backups);
        assert_eq!(window.gaps.len(), 1, "{window:?}");
        let gap = &window.gaps[0];
        assert_eq!(
            (gap.first_missing.as_str(), gap.last_missing.as_str()),
            (segment(13).as_str(), segment(14).as_str())
        );
        assert_eq!(gap.backups_broken, ["b"]);
        assert_eq!(gap.lost_to, None);
        // The window ends with the last segment held, reached from the first backup.
        assert_eq!(window.earliest, at(3));
        assert_eq!(window.latest, at(1).max(at(3)));
    }

    #[test]
    fn a_later_timeline_without_its_history_is_a_gap() {
        let mut names: Vec<String> = (2..=4).map(segment).collect();
        names.push(wal::segment_name(2, 4, MB16));
        names.push(wal::segment_name(2, 5, MB16));
        let files: Vec<(&str, i64)> = names.iter().map(|n| (n.as_str(), 7)).collect();
        let window = window_of(&archive_of(&files), &[backup("a", 2, 2, 1)]);
        assert_eq!(window.gaps.len(), 1, "{window:?}");
        assert_eq!(window.gaps[0].first_missing, "00000002.history");
        assert_eq!(window.gaps[0].segments, 0);
        assert!(
            window.gaps[0]
                .describe("b")
                .starts_with("timeline history file 00000002.history is missing")
        );
    }

    #[test]
    fn a_proof_holds_what_it_proved_unchanged_and_nothing_else() {
        let names: Vec<String> = [2, 3, 4, 7].into_iter().map(segment).collect();
        let mut files: Vec<(&str, i64)> = names.iter().map(|n| (n.as_str(), 1)).collect();
        files.push(("00000002.history", 1));
        let archive = archive_of(&files);
        let all: Vec<(&ListedFile, bool)> = archive
            .files
            .iter()
            .map(|listed| (listed, !listed.key.ends_with("07.zst")))
            .collect();
        let proof = ArchiveProof::of("j", MB16, &all);
        assert!(proof.files.contains_key("00000002/00000002.history.zst"));
        assert!(
            archive
                .files
                .iter()
                .all(|listed| proof.holds(listed, false))
        );
        // One read without its key: proven unchanged, its content not checked.
        let unchecked = archive
            .files
            .iter()
            .find(|l| l.key.ends_with("07.zst"))
            .unwrap();
        assert!(!proof.holds(unchecked, true));
        assert!(proof.holds(&archive.files[0], true));
        // Stored again later, or earlier (a copy that kept an old time), or at another size.
        for change in [
            |l: &mut ListedFile| l.stored_at = at(2),
            |l: &mut ListedFile| l.stored_at = at(0),
            |l: &mut ListedFile| l.size += 1,
        ] {
            let mut replaced = archive.files[0].clone();
            change(&mut replaced);
            assert!(!proof.holds(&replaced, false));
        }
        let mut unproven = archive.files[0].clone();
        unproven.key = unproven.key.replace(&segment(2), &segment(5));
        assert!(!proof.holds(&unproven, false));
    }
}
