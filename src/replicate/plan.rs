//! What `replicate` will copy, decided from listings (and, with `--verify`, from reading
//! every object) before anything is written: per backup and repository the objects it
//! lacks or holds damaged, then its manifest, then its open uploads; per repository the
//! WAL it lacks.

use std::collections::{BTreeMap, BTreeSet};

use bytes::Bytes;
use futures::StreamExt;

use super::{Action, ActionKind, NotCopied, ReplicateReport};
use crate::inventory::{self, Presence, Survey};
use crate::layout;
use crate::manifest::ObjectEntry;
use crate::pipeline::Tally;
use crate::repository::Repository;
use crate::storage::IncompleteUpload;

/// What one repository gets of one backup, in this order: objects, manifest, open uploads
/// aborted. A failure stops the rest, so a manifest is never written before its objects.
pub struct BackupFill {
    pub job: String,
    pub id: String,
    pub target: Repository,
    pub objects: Vec<ObjectCopy>,
    pub manifest: Option<ManifestCopy>,
    pub open_uploads: Vec<IncompleteUpload>,
    /// A removal record of it was read while planning and judged not prune's (planted,
    /// or naming the newest backup): one found before the manifest is written is that one.
    pub record_ignored: bool,
    /// The job's newest backup, which prune never removes.
    pub newest: bool,
}

pub struct ObjectCopy {
    pub object: ObjectEntry,
    pub what: ActionKind,
    /// Repositories holding it at its recorded size, tried in this order.
    pub sources: Vec<Repository>,
}

pub struct ManifestCopy {
    pub bytes: Bytes,
    pub source: Repository,
}

/// An archived WAL file one repository lacks.
pub struct WalCopy {
    pub job: String,
    pub key: String,
    pub bytes: u64,
    pub target: Repository,
    pub sources: Vec<Repository>,
}

/// A history file's signature a repository lacks (its write failed there).
pub struct SignatureCopy {
    pub key: String,
    pub target: Repository,
    pub source: Repository,
}

/// Everything planned for one job, and what planning found.
#[derive(Default)]
pub struct JobCopies {
    pub backups: Vec<BackupFill>,
    pub wal: Vec<WalCopy>,
    pub signatures: Vec<SignatureCopy>,
    pub not_copied: Vec<NotCopied>,
    pub ignored_records: Vec<String>,
    pub failures: Vec<String>,
    pub unreachable: Vec<(String, String)>,
}

impl JobCopies {
    /// Every copy and abort, in the order they are made: what a dry run prints.
    pub fn actions(&self) -> Vec<Action> {
        let backups = self.backups.iter().flat_map(|fill| fill.actions());
        backups
            .chain(self.wal.iter().map(|copy| copy.action()))
            .collect()
    }

    /// What planning found (unreachable repositories, failures, backups left alone) into
    /// the report.
    pub fn findings_into(&self, report: &mut ReplicateReport) {
        for (name, reason) in &self.unreachable {
            if !report.unreachable.iter().any(|(n, _)| n == name) {
                report.unreachable.push((name.clone(), reason.clone()));
            }
        }
        report.failures.extend(self.failures.iter().cloned());
        report.not_copied.extend(self.not_copied.iter().cloned());
        report
            .ignored_records
            .extend(self.ignored_records.iter().cloned());
    }
}

impl BackupFill {
    /// The actions this fill takes, as a dry run names them (from the first source).
    pub fn actions(&self) -> Vec<Action> {
        let action = |object: &str, bytes: u64, from: Option<&Repository>, what| Action {
            job: self.job.clone(),
            id: self.id.clone(),
            object: object.to_string(),
            bytes,
            from: from.map(|r| r.name.clone()),
            to: self.target.name.clone(),
            what,
        };
        let objects = self.objects.iter().map(|copy| {
            let first = copy.sources.first();
            action(&copy.object.name, copy.object.size, first, copy.what)
        });
        let manifest = self.manifest.iter().map(|copy| {
            let size = copy.bytes.len() as u64;
            action(
                layout::MANIFEST_NAME,
                size,
                Some(&copy.source),
                ActionKind::Copy,
            )
        });
        let uploads = self
            .open_uploads
            .iter()
            .map(|upload| action(upload_name(upload), 0, None, ActionKind::AbortUpload));
        objects.chain(manifest).chain(uploads).collect()
    }
}

impl WalCopy {
    pub fn action(&self) -> Action {
        Action {
            job: self.job.clone(),
            id: "wal".to_string(),
            object: self.key.rsplit('/').next().unwrap_or_default().to_string(),
            bytes: self.bytes,
            from: self.sources.first().map(|r| r.name.clone()),
            to: self.target.name.clone(),
            what: ActionKind::Copy,
        }
    }
}

pub fn upload_name(upload: &IncompleteUpload) -> &str {
    upload.key.rsplit('/').next().unwrap_or_default()
}

/// Plans one job across `repositories`; reads only.
pub(super) async fn plan_job(
    job: &str,
    repositories: &[Repository],
    read_objects: bool,
) -> JobCopies {
    let survey = inventory::survey(repositories, job).await;
    let mut planned = JobCopies {
        unreachable: survey.unreachable.clone(),
        ..JobCopies::default()
    };
    let removed = removal_records(&survey, job, &mut planned).await;
    let committed = survey.committed_ids();
    let newest = committed.last().cloned();
    for id in committed {
        // Retention let it go: copying it back from a repository that was out of reach (or
        // whose own plan still keeps it) would undo the prune.
        let record = removed.get(&id);
        if let Some((when, record)) = record
            && honoured(
                &survey,
                job,
                &id,
                (*when, record),
                newest.as_deref(),
                &mut planned,
            )
            .await
        {
            continue;
        }
        let first = planned.backups.len();
        plan_backup(job, &id, &survey, read_objects, &mut planned).await;
        for fill in &mut planned.backups[first..] {
            fill.record_ignored = record.is_some();
            fill.newest = newest.as_ref() == Some(&id);
        }
    }
    let reachable: Vec<&Repository> = survey.listed.iter().map(|(r, _)| *r).collect();
    plan_wal(job, &reachable, &mut planned).await;
    planned
}

/// Whether the removal record of `job/id` stops it being copied; if it does where some
/// repository lacks it, the report says so.
async fn honoured(
    survey: &Survey<'_>,
    job: &str,
    id: &str,
    (when, record): (Option<chrono::DateTime<chrono::Utc>>, &String),
    newest: Option<&str>,
    planned: &mut JobCopies,
) -> bool {
    let (holders, lacking): (Vec<_>, Vec<_>) = survey
        .listed
        .iter()
        .partition(|(_, held)| held.get(id).is_some_and(|h| h.manifest));
    if lacking.is_empty() {
        return true;
    }
    if !honour_record(survey, job, id, record, newest, planned).await {
        return false;
    }
    let names = |list: &[&(&Repository, _)]| {
        list.iter()
            .map(|(r, _)| format!("'{}'", r.name))
            .collect::<Vec<_>>()
            .join(", ")
    };
    planned.not_copied.push(NotCopied {
        job: job.to_string(),
        id: id.to_string(),
        why: format!(
            "not copied into {}: prune removed it{} (record in '{record}'); {} still hold(s) it until its own retention lets it go",
            names(&lacking),
            when.map(|at| format!(" on {}", at.format("%Y-%m-%d %H:%M UTC")))
                .unwrap_or_default(),
            names(&holders),
        ),
    });
    true
}

/// Whether the removal record of `job/id` in repository `record` is one to honour: it reads
/// as a record of that backup, and that backup is not the job's newest (prune never removes
/// a repository's newest backup, so such a record was not written by prune). One that is
/// not is named in the report and ignored: a planted record must not stop replication.
async fn honour_record(
    survey: &Survey<'_>,
    job: &str,
    id: &str,
    record: &str,
    newest: Option<&str>,
    planned: &mut JobCopies,
) -> bool {
    let key = layout::removed_key(job, id);
    if newest == Some(id) {
        planned.ignored_records.push(format!(
            "'{key}' in repository '{record}' names the newest backup of job '{job}', which prune never removes: ignored, and the backup copied"
        ));
        return false;
    }
    let Some((repository, _)) = survey.listed.iter().find(|(r, _)| r.name == record) else {
        return true;
    };
    if holds_prune_record(repository, job, id).await {
        return true;
    }
    planned.ignored_records.push(format!(
        "'{key}' in repository '{record}' is no removal record lifeboat wrote (unreadable, of another backup, or dated before the backup was made): ignored, and the backup copied; remove it"
    ));
    false
}

/// Whether `repository` holds a removal record of `job/id` that prune could have written:
/// one that reads, dated after the backup was made (prune removes a backup only after).
pub async fn holds_prune_record(repository: &Repository, job: &str, id: &str) -> bool {
    let made = layout::parse_backup_id(id);
    repository
        .read_tombstone(job, id)
        .await
        .is_some_and(|record| made.is_none_or(|made| record.removed_at >= made))
}

/// The backups of `job` prune removed, from the removal records of every listed repository:
/// when, and one repository holding the record.
async fn removal_records(
    survey: &Survey<'_>,
    job: &str,
    planned: &mut JobCopies,
) -> BTreeMap<String, (Option<chrono::DateTime<chrono::Utc>>, String)> {
    let mut removed = BTreeMap::new();
    for (repository, _) in &survey.listed {
        match repository.tombstones(job).await {
            Ok(records) => {
                for (id, at) in records {
                    removed
                        .entry(id)
                        .or_insert_with(|| (at, repository.name.clone()));
                }
            }
            Err(e) => planned.failures.push(e.chain().join(": ")),
        }
    }
    removed
}

async fn plan_backup(
    job: &str,
    id: &str,
    survey: &Survey<'_>,
    read_objects: bool,
    planned: &mut JobCopies,
) {
    let listed = &survey.listed;
    let Some((manifest, manifest_bytes, manifest_source)) = survey.manifest(job, id).await else {
        planned.failures.push(format!(
            "backup {job}/{id}: no repository holds a readable manifest"
        ));
        return;
    };
    for (target, holdings) in listed {
        let holding = holdings.get(id).cloned().unwrap_or_default();
        // A repository with a manifest of its own is filled to what that manifest names:
        // copies re-encrypted apart (rekey with a repository down) name different objects,
        // and each is whole by its own manifest.
        let own = match holding.manifest && holding.presence(&manifest) != Presence::Complete {
            true => inventory::own_manifest(target, job, id).await,
            false => None,
        };
        if let Some(own) = own.as_ref().filter(|own| !own.same_backup(&manifest)) {
            planned.failures.push(format!(
                "backup {job}/{id}: repository '{}' holds a different backup under this id (started {} on '{}', where '{}' holds one started {} on '{}'): two runs took one id; left as it is for `lifeboat verify`",
                target.name,
                own.started_at.to_rfc3339(),
                own.host,
                manifest_source.name,
                manifest.started_at.to_rfc3339(),
                manifest.host
            ));
            continue;
        }
        let expected = own.as_ref().unwrap_or(&manifest);
        let mut fill = BackupFill {
            job: job.to_string(),
            id: id.to_string(),
            target: (*target).clone(),
            objects: Vec::new(),
            manifest: None,
            open_uploads: Vec::new(),
            record_ignored: false,
            newest: false,
        };
        for object in &expected.objects {
            let key = layout::object_key(job, id, &object.name);
            let what = if holding.objects.get(&object.name) != Some(&object.size) {
                ActionKind::Copy
            } else if read_objects && !intact(target, &key, object).await {
                ActionKind::Replace
            } else {
                continue;
            };
            let sources = listed
                .iter()
                .filter(|(r, h)| {
                    r.name != target.name
                        && h.get(id)
                            .is_some_and(|h| h.objects.get(&object.name) == Some(&object.size))
                })
                .map(|(r, _)| (*r).clone())
                .collect();
            fill.objects.push(ObjectCopy {
                object: object.clone(),
                what,
                sources,
            });
        }
        if !holding.manifest {
            fill.manifest = Some(ManifestCopy {
                bytes: manifest_bytes.clone(),
                source: manifest_source.clone(),
            });
        }
        // Interrupted attempts: a region that went away mid-upload could not be told to
        // abort then.
        if let Ok(open) = target
            .store
            .list_incomplete(&layout::backup_prefix(job, id))
            .await
        {
            fill.open_uploads = open;
        }
        planned.backups.push(fill);
    }
}

/// Whether `repository` holds `key` with the stored sha256 and size of `object`.
async fn intact(repository: &Repository, key: &str, object: &ObjectEntry) -> bool {
    let Ok(mut stream) = repository.store.get(key, None).await else {
        return false;
    };
    let mut tally = Tally::default();
    while let Some(chunk) = stream.next().await {
        match chunk {
            Ok(chunk) => tally.update(&chunk),
            Err(_) => return false,
        }
    }
    tally.finish() == (object.size, object.sha256.clone())
}

/// Whether the WAL object at `key` is a history file, which wal-push signs.
pub fn is_signed_kind(key: &str) -> bool {
    key.contains(".history.") || key.contains(".backup.")
}

/// The archived WAL files each repository lacks, and the history signatures. WAL has no
/// manifest: a copy is checked by decoding it on the way.
async fn plan_wal(job: &str, repositories: &[&Repository], planned: &mut JobCopies) {
    let prefix = layout::wal_prefix(job);
    let mut listed: Vec<(&Repository, BTreeMap<String, u64>)> = Vec::new();
    // Per repository, the history files that have their signature beside them.
    let mut signed: Vec<BTreeSet<String>> = Vec::new();
    for repository in repositories {
        match repository.store.list(&prefix).await {
            Ok(objects) => {
                signed.push(
                    objects
                        .iter()
                        .filter_map(|o| o.key.strip_suffix(".minisig").map(str::to_string))
                        .collect(),
                );
                let files = objects
                    .into_iter()
                    .filter(|o| layout::wal_file_of_key(job, &o.key).is_some())
                    .map(|o| (o.key, o.size))
                    .collect();
                listed.push((repository, files));
            }
            Err(e) => planned.failures.push(
                repository
                    .error(&format!("list the WAL archive '{prefix}'"), e)
                    .chain()
                    .join(": "),
            ),
        }
    }
    let every_key: BTreeSet<&String> = listed.iter().flat_map(|(_, keys)| keys.keys()).collect();
    for key in every_key {
        let holders: Vec<&Repository> = listed
            .iter()
            .filter(|(_, keys)| keys.contains_key(key))
            .map(|(r, _)| *r)
            .collect();
        for (index, (target, held)) in listed.iter().enumerate() {
            if !held.contains_key(key) {
                planned.wal.push(WalCopy {
                    job: job.to_string(),
                    key: key.clone(),
                    bytes: listed
                        .iter()
                        .find_map(|(_, keys)| keys.get(key).copied())
                        .unwrap_or_default(),
                    target: (*target).clone(),
                    sources: holders.iter().map(|r| (*r).clone()).collect(),
                });
                continue;
            }
            // A history file stored without its signature (the signature's write failed
            // there) gets it from a repository that has it.
            let source = listed
                .iter()
                .zip(&signed)
                .find(|((_, keys), signed)| keys.contains_key(key) && signed.contains(key))
                .map(|((r, _), _)| *r);
            if is_signed_kind(key)
                && !signed[index].contains(key)
                && let Some(source) = source
            {
                planned.signatures.push(SignatureCopy {
                    key: key.clone(),
                    target: (*target).clone(),
                    source: source.clone(),
                });
            }
        }
    }
}
