//! WAL that no kept physical backup needs. A backup replays from its first segment onward,
//! on its own timeline and the timelines that branch later, so a file is needed when some kept
//! backup has `timeline <= file's timeline` and `first segment <= file's segment`. Timeline
//! history files are tiny and always kept. A later timeline that branched from elsewhere is
//! kept too: over-keeping costs storage, under-keeping costs a restore.

use super::delete::delete_keys;
use super::report::{BackupOutcome, WalFloor, WalPrune, WalRepositoryPrune};
use crate::inventory::Survey;
use crate::layout;
use crate::repository::Repository;
use crate::storage::{self, ObjectMeta};
use crate::wal::{WalFile, WalFileKind};

use crate::wal_archive::WAL_PAGE;

/// Where replay of the kept backups starts, per timeline: the WAL below it goes.
#[derive(Debug)]
pub struct Floors {
    floors: Vec<WalFloor>,
    segment_size: u64,
}

impl Floors {
    fn needed(&self, file: &WalFile) -> bool {
        let Some(segment) = file.segment(self.segment_size) else {
            return file.kind == WalFileKind::History;
        };
        self.floors
            .iter()
            .any(|floor| file.timeline >= floor.timeline && segment >= floor.segment)
    }
}

/// Where the kept backups start replaying, from their manifests. An error says why WAL must
/// be left alone this time (a kept backup whose start is unknown could need any of it).
pub(super) async fn floors(
    survey: &Survey<'_>,
    job: &str,
    backups: &[BackupOutcome],
) -> Result<Floors, String> {
    let mut floors: Vec<WalFloor> = Vec::new();
    let mut segment_size: Option<u64> = None;
    for backup in backups.iter().filter(|b| b.keep) {
        let Some((manifest, _, _)) = survey.manifest(job, &backup.id).await else {
            return Err(format!(
                "the manifest of kept backup {} could not be read",
                backup.id
            ));
        };
        let (Some(first_wal), Some(size)) =
            (&manifest.source.first_wal, manifest.source.wal_segment_size)
        else {
            return Err(format!(
                "kept backup {} does not record its first WAL segment",
                backup.id
            ));
        };
        if segment_size.is_some_and(|known| known != size) {
            return Err("kept backups differ in WAL segment size".to_string());
        }
        segment_size = Some(size);
        let file = WalFile::parse(first_wal)
            .filter(|f| f.kind == WalFileKind::Segment)
            .ok_or_else(|| {
                format!(
                    "kept backup {} names an invalid first WAL segment",
                    backup.id
                )
            })?;
        let segment = file.segment(size).ok_or_else(|| {
            format!(
                "kept backup {} names a first WAL segment {first_wal} that no segment of {size} bytes has",
                backup.id
            )
        })?;
        // Only the lowest floor per timeline matters.
        match floors.iter_mut().find(|f| f.timeline == file.timeline) {
            Some(floor) if floor.segment <= segment => {}
            Some(floor) => {
                *floor = WalFloor {
                    backup: backup.id.clone(),
                    first_wal: first_wal.to_string(),
                    timeline: file.timeline,
                    segment,
                };
            }
            None => floors.push(WalFloor {
                backup: backup.id.clone(),
                first_wal: first_wal.to_string(),
                timeline: file.timeline,
                segment,
            }),
        }
    }
    let Some(segment_size) = segment_size else {
        return Err("no kept backup to keep WAL for".to_string());
    };
    floors.sort_by_key(|f| f.timeline);
    Ok(Floors {
        floors,
        segment_size,
    })
}

/// Whether `prune` removes the WAL files no kept backup needs, or only counts them (a dry
/// run): the files are listed a page at a time, so that memory does not grow with the
/// archive, and the plan holds the rule they go by rather than their names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Mode {
    Count,
    Remove,
}

/// Removes (or counts), in each repository, the WAL files `floors` does not need.
pub(super) async fn prune(
    repositories: &[&Repository],
    job: &str,
    floors: &Floors,
    mode: Mode,
    failures: &mut Vec<String>,
) -> WalPrune {
    let prefix = layout::wal_prefix(job);
    let mut outcomes = Vec::new();
    for repository in repositories {
        let mut outcome = WalRepositoryPrune {
            repository: repository.name.clone(),
            removed: 0,
            kept: 0,
            retained: 0,
            versions: 0,
        };
        // Page by page, so that memory does not grow with the archive.
        let listed = storage::for_each_page(
            repository.store.as_ref(),
            &prefix,
            WAL_PAGE,
            async |page: Vec<ObjectMeta>| {
                let total = page.len();
                let unneeded: Vec<String> = page
                    .into_iter()
                    .filter(|object| {
                        // A backup history file's signature goes with it.
                        let key = object.key.strip_suffix(".minisig").unwrap_or(&object.key);
                        layout::wal_file_of_key(job, key).is_some_and(|f| !floors.needed(&f))
                    })
                    .map(|object| object.key)
                    .collect();
                let mut removed = unneeded.len();
                outcome.kept += total - removed;
                if mode == Mode::Remove {
                    let removal = delete_keys(repository, unneeded).await;
                    let left = removal.retained.len() + removal.failures.len();
                    removed -= left;
                    outcome.kept += left;
                    outcome.retained += removal.retained.len();
                    outcome.versions += removal.versions;
                    failures.extend(removal.failures);
                }
                outcome.removed += removed;
            },
        )
        .await;
        if let Err(e) = listed {
            failures.push(format!(
                "listing WAL in repository '{}': {e}",
                repository.name
            ));
        }
        outcomes.push(outcome);
    }
    WalPrune {
        floors: floors.floors.clone(),
        repositories: outcomes,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wal::segment_name;

    const MB16: u64 = 16 * 1024 * 1024;

    fn floor(timeline: u32, segment: u64) -> WalFloor {
        WalFloor {
            backup: "b".to_string(),
            first_wal: segment_name(timeline, segment, MB16),
            timeline,
            segment,
        }
    }

    fn needed(floors: &Floors, name: &str) -> bool {
        floors.needed(&WalFile::parse(name).unwrap())
    }

    #[test]
    fn wal_before_the_oldest_kept_backup_goes() {
        let floors = Floors {
            floors: vec![floor(1, 0x10)],
            segment_size: MB16,
        };
        assert!(!needed(&floors, "00000001000000000000000F"));
        assert!(!needed(&floors, "00000001000000000000000E.00000028.backup"));
        assert!(needed(&floors, "000000010000000000000010"));
        assert!(needed(&floors, "000000010000000000000010.00000028.backup"));
        assert!(needed(&floors, "000000010000000100000000"));
        // Later timelines branch after the backup: replay follows them.
        assert!(needed(&floors, "000000020000000000000011"));
        assert!(needed(&floors, "000000020000000000000011.partial"));
        assert!(!needed(&floors, "000000020000000000000001"));
        assert!(needed(&floors, "00000002.history"));
    }

    #[test]
    fn an_older_timeline_is_needed_only_by_a_backup_on_it() {
        // A backup on timeline 1 from segment 0x10, and one on timeline 3 from 0x30.
        let floors = Floors {
            floors: vec![floor(1, 0x10), floor(3, 0x30)],
            segment_size: MB16,
        };
        assert!(needed(&floors, "000000010000000000000020"));
        assert!(needed(&floors, "000000030000000000000020"));
        let only_new = Floors {
            floors: vec![floor(3, 0x30)],
            segment_size: MB16,
        };
        // Timeline 1 and 2 files are not replayed from a backup on timeline 3.
        assert!(!needed(&only_new, "000000010000000000000040"));
        assert!(!needed(&only_new, "000000020000000000000040"));
        assert!(needed(&only_new, "000000030000000000000030"));
        assert!(needed(&only_new, "00000001.history"));
    }
}
