//! `lifeboat replicate [JOB]`: makes every reachable repository hold every committed backup.
//! What a repository lacks (or, with `--verify`, holds damaged) is copied from another
//! that holds it intact, its sha256 checked while it streams; the manifest is written last,
//! so a repository never shows a backup before it holds all of it. Uploads left open under
//! a backup that is committed are aborted: nobody is writing them any more. Archived WAL
//! a repository lacks is copied too, checked by decoding it on the way.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use futures::StreamExt;
use serde::Serialize;
use tracing::Instrument;

use crate::config::Config;
use crate::error::{Error, ErrorKind, Result};
use crate::human::human_size;
use crate::inventory::{self, Presence, Survey};
use crate::layout;
use crate::manifest::ObjectEntry;
use crate::pipeline::{CHANNEL_BOUND, Tally};
use crate::repository::Repository;
use crate::storage::{self, PartStream};

pub struct ReplicateOptions {
    pub job: Option<String>,
    /// Print the plan; copy nothing.
    pub dry_run: bool,
    /// Also read every object a repository holds and replace those whose sha256 is wrong.
    pub verify: bool,
    /// Also fill repositories that lack their marker while others hold theirs, and write
    /// their marker once every backup is in.
    pub reseed: bool,
}

/// One thing done (or, in a dry run, to be done) to a repository.
#[derive(Debug, Serialize)]
pub struct Action {
    pub job: String,
    pub id: String,
    /// An object name, or "manifest.json".
    pub object: String,
    pub bytes: u64,
    pub from: Option<String>,
    pub to: String,
    pub what: ActionKind,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ActionKind {
    Copy,
    Replace,
    AbortUpload,
}

#[derive(Debug, Serialize)]
pub struct ReplicateReport {
    pub dry_run: bool,
    pub actions: Vec<Action>,
    /// What could not be done, each naming the backup, object and repository.
    pub failures: Vec<String>,
    /// Repositories that could not be listed, with the reason.
    pub unreachable: Vec<(String, String)>,
    /// Backups a repository still holds that were not copied, and why: prune removed them.
    pub not_copied: Vec<NotCopied>,
    /// Removal records not honoured, and why.
    pub ignored_records: Vec<String>,
    /// Repositories without a marker that were filled (`--reseed`), and whether the marker
    /// was written (not in a dry run, nor after a failure).
    pub reseeded: Vec<(String, bool)>,
}

/// A backup `replicate` leaves where it is.
#[derive(Debug, Serialize)]
pub struct NotCopied {
    pub job: String,
    pub id: String,
    pub why: String,
}

impl ReplicateReport {
    /// Ok when every reachable repository now holds every backup and all were reachable.
    pub fn outcome(&self) -> Result<()> {
        if self.failures.is_empty() && self.unreachable.is_empty() {
            return Ok(());
        }
        let mut error = Error::new(
            ErrorKind::Storage,
            format!(
                "replication incomplete: {} failure(s), {} unreachable repository(ies)",
                self.failures.len(),
                self.unreachable.len()
            ),
        );
        for (name, reason) in &self.unreachable {
            error = error.with_hint(format!("repository '{name}': {reason}"));
        }
        Err(error.with_hint("run `lifeboat replicate` again once every repository is reachable"))
    }
}

pub async fn run(config: &Config, options: &ReplicateOptions) -> Result<ReplicateReport> {
    let jobs: Vec<String> = match &options.job {
        Some(name) => vec![config.job(name)?.name.clone()],
        None => config.jobs.iter().map(|j| j.name.clone()).collect(),
    };
    let mut held_locks = Vec::with_capacity(jobs.len());
    for job in &jobs {
        held_locks.push(crate::lock::acquire(config, job, "replicate").await?);
    }
    let mut report = ReplicateReport {
        dry_run: options.dry_run,
        actions: Vec::new(),
        failures: Vec::new(),
        unreachable: Vec::new(),
        not_copied: Vec::new(),
        ignored_records: Vec::new(),
        reseeded: Vec::new(),
    };
    // A repository without its marker while others hold theirs was wiped (or is new, or
    // misconfigured): filled only when the operator says so.
    let all = Repository::open_all(config).await;
    let markers = crate::repository::read_markers(&all).await;
    let mut repositories = Vec::with_capacity(all.len());
    for (index, repository) in all.iter().enumerate() {
        match markers.wiped(&all, index) {
            Some(wiped) if !options.reseed => report
                .failures
                .push(format!("{wiped}; {}", wiped.hints().join("; "))),
            Some(_) => {
                report.reseeded.push((repository.name.clone(), false));
                repositories.push(repository.clone());
            }
            None => repositories.push(repository.clone()),
        }
    }
    for job in &jobs {
        let survey = inventory::survey(&repositories, job).await;
        for (name, reason) in &survey.unreachable {
            if !report.unreachable.iter().any(|(n, _)| n == name) {
                report.unreachable.push((name.clone(), reason.clone()));
            }
        }
        let removed = removal_records(&survey, job, &mut report).await;
        let committed = survey.committed_ids();
        let newest = committed.last().cloned();
        for id in committed {
            // Retention let it go: copying it back from a repository that was out of reach
            // (or whose own plan still keeps it) would undo the prune.
            if let Some((when, record)) = removed.get(&id) {
                let (holders, lacking): (Vec<_>, Vec<_>) = survey
                    .listed
                    .iter()
                    .partition(|(_, held)| held.get(&id).is_some_and(|h| h.manifest));
                let honoured = match lacking.is_empty() {
                    true => true,
                    false => {
                        honour_record(&survey, job, &id, record, newest.as_deref(), &mut report)
                            .await
                    }
                };
                if !lacking.is_empty() && honoured {
                    let names = |list: &[&(&Repository, _)]| {
                        list.iter()
                            .map(|(r, _)| format!("'{}'", r.name))
                            .collect::<Vec<_>>()
                            .join(", ")
                    };
                    report.not_copied.push(NotCopied {
                        job: job.clone(),
                        id: id.clone(),
                        why: format!(
                            "not copied into {}: prune removed it{} (record in '{record}'); {} still hold(s) it until its own retention lets it go",
                            names(&lacking),
                            when.map(|at| format!(" on {}", at.format("%Y-%m-%d %H:%M UTC")))
                                .unwrap_or_default(),
                            names(&holders),
                        ),
                    });
                }
                if honoured {
                    continue;
                }
            }
            let span = tracing::info_span!("replicate", job = %job, backup = %id);
            replicate_backup(job, &id, &survey, options, &mut report)
                .instrument(span)
                .await;
        }
        let reachable: Vec<&Repository> = survey.listed.iter().map(|(r, _)| *r).collect();
        replicate_wal(job, &reachable, options, &mut report)
            .instrument(tracing::info_span!("replicate", job = %job))
            .await;
    }
    let failed = !report.failures.is_empty() || !report.unreachable.is_empty();
    for (name, marked) in &mut report.reseeded {
        if options.dry_run || failed {
            continue;
        }
        let repository = repositories
            .iter()
            .find(|r| &r.name == name)
            .expect("a reseeded repository is one of them");
        match repository.write_marker().await {
            Ok(()) => *marked = true,
            Err(e) => report.failures.push(e.chain().join(": ")),
        }
    }
    Ok(report)
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
    report: &mut ReplicateReport,
) -> bool {
    let key = layout::removed_key(job, id);
    if newest == Some(id) {
        report.ignored_records.push(format!(
            "'{key}' in repository '{record}' names the newest backup of job '{job}', which prune never removes: ignored, and the backup copied"
        ));
        return false;
    }
    let Some((repository, _)) = survey.listed.iter().find(|(r, _)| r.name == record) else {
        return true;
    };
    // Prune removes a backup after it was made: a record dated before is not prune's.
    let made = layout::parse_backup_id(id);
    if repository
        .read_tombstone(job, id)
        .await
        .is_some_and(|record| made.is_none_or(|made| record.removed_at >= made))
    {
        return true;
    }
    report.ignored_records.push(format!(
        "'{key}' in repository '{record}' is no removal record lifeboat wrote (unreadable, of another backup, or dated before the backup was made): ignored, and the backup copied; remove it"
    ));
    false
}

/// The backups of `job` prune removed, from the removal records of every listed repository:
/// when, and one repository holding the record.
async fn removal_records(
    survey: &Survey<'_>,
    job: &str,
    report: &mut ReplicateReport,
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
            Err(e) => report.failures.push(e.chain().join(": ")),
        }
    }
    removed
}

/// Copies into each repository the archived WAL files it lacks. WAL has no manifest: an
/// object is taken as intact when its zstd frame (with its checksum) decodes completely.
async fn replicate_wal(
    job: &str,
    repositories: &[&Repository],
    options: &ReplicateOptions,
    report: &mut ReplicateReport,
) {
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
                listed.push((
                    repository,
                    objects
                        .into_iter()
                        .filter(|o| layout::wal_file_of_key(job, &o.key).is_some())
                        .map(|o| (o.key, o.size))
                        .collect(),
                ))
            }
            Err(e) => report.failures.push(
                repository
                    .error(&format!("list the WAL archive '{prefix}'"), e)
                    .chain()
                    .join(": "),
            ),
        }
    }
    let every_key: BTreeSet<&String> = listed.iter().flat_map(|(_, keys)| keys.keys()).collect();
    for key in every_key {
        let name = key.rsplit('/').next().unwrap_or_default().to_string();
        for (index, (target, held)) in listed.iter().enumerate() {
            if held.contains_key(key) {
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
                    && !options.dry_run
                    && let Err(e) = target.copy_signature_from(source, key).await
                {
                    report.failures.push(e.chain().join(": "));
                }
                continue;
            }
            let sources: Vec<&Repository> = listed
                .iter()
                .filter(|(_, keys)| keys.contains_key(key))
                .map(|(r, _)| *r)
                .collect();
            let mut action = Action {
                job: job.to_string(),
                id: "wal".to_string(),
                object: name.clone(),
                bytes: listed
                    .iter()
                    .find_map(|(_, keys)| keys.get(key).copied())
                    .unwrap_or_default(),
                from: sources.first().map(|r| r.name.clone()),
                to: target.name.clone(),
                what: ActionKind::Copy,
            };
            if !options.dry_run {
                let mut copied = false;
                let mut last_error = None;
                for source in &sources {
                    match copy_wal(source, target, key).await {
                        Ok(()) => {
                            action.from = Some(source.name.clone());
                            copied = true;
                            break;
                        }
                        Err(e) => {
                            tracing::warn!(key = %key, from = %source.name, to = %target.name, error = %e.chain().join(": "), "WAL copy failed; trying the next repository");
                            last_error = Some(e.chain().join(": "));
                        }
                    }
                }
                if !copied {
                    report.failures.push(format!(
                        "WAL {job}/{}: unable to copy it into repository '{}': {}",
                        crate::error::escape_controls(&name),
                        target.name,
                        last_error.unwrap_or_else(|| "no other repository holds it".to_string())
                    ));
                    continue;
                }
            }
            report.actions.push(action);
        }
    }
}

/// Whether the WAL object at `key` is a history file, which wal-push signs.
fn is_signed_kind(key: &str) -> bool {
    key.contains(".history.") || key.contains(".backup.")
}

async fn copy_wal(source: &Repository, target: &Repository, key: &str) -> Result<()> {
    let stored = storage::get_bytes(source.store.as_ref(), key)
        .await
        .map_err(|e| source.error(&format!("read '{key}'"), e))?;
    let checked = stored.clone();
    tokio::task::spawn_blocking(move || crate::wal_archive::raw_sha256_of_stored(&checked))
        .await
        .map_err(|e| Error::new(ErrorKind::Storage, "the decompressor stopped").with_source(e))?
        .map_err(|e| {
            Error::new(
                ErrorKind::Verification,
                format!("damaged '{key}' in repository '{}'", source.name),
            )
            .with_source(e)
        })?;
    // A history file keeps its signature (segments are not signed); where signatures are
    // required, one that is not trusted is copied nowhere.
    if is_signed_kind(key) {
        if source.trust.required() {
            let signature = source.signature_of(key).await?;
            source
                .trust
                .check(&stored, signature.as_deref(), key)
                .map_err(|untrusted| {
                    Error::new(
                        ErrorKind::Verification,
                        format!(
                            "unable to trust '{key}' in repository '{}': {untrusted}",
                            source.name
                        ),
                    )
                })?;
        }
        target.copy_signature_from(source, key).await?;
    }
    match target.store.create_if_absent(key, stored).await {
        Ok(()) | Err(storage::StoreError::AlreadyExists { .. }) => Ok(()),
        Err(e) => Err(target.error(&format!("store '{key}'"), e)),
    }
}

async fn replicate_backup(
    job: &str,
    id: &str,
    survey: &Survey<'_>,
    options: &ReplicateOptions,
    report: &mut ReplicateReport,
) {
    let listed = &survey.listed;
    let Some((manifest, manifest_bytes, manifest_source)) = survey.manifest(job, id).await else {
        report.failures.push(format!(
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
            report.failures.push(format!(
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
        let mut target_failed = false;
        for object in &expected.objects {
            let key = layout::object_key(job, id, &object.name);
            let kind = if holding.objects.get(&object.name) != Some(&object.size) {
                ActionKind::Copy
            } else if options.verify && !options.dry_run && !intact(target, &key, object).await {
                ActionKind::Replace
            } else {
                continue;
            };
            let sources: Vec<&Repository> = listed
                .iter()
                .filter(|(r, h)| {
                    r.name != target.name
                        && h.get(id)
                            .is_some_and(|h| h.objects.get(&object.name) == Some(&object.size))
                })
                .map(|(r, _)| *r)
                .collect();
            let mut action = Action {
                job: job.to_string(),
                id: id.to_string(),
                object: object.name.clone(),
                bytes: object.size,
                from: sources.first().map(|r| r.name.clone()),
                to: target.name.clone(),
                what: kind,
            };
            if options.dry_run {
                report.actions.push(action);
                continue;
            }
            let mut copied = false;
            for source in &sources {
                match copy_object(source, target, &key, object).await {
                    Ok(()) => {
                        action.from = Some(source.name.clone());
                        copied = true;
                        break;
                    }
                    Err(e) => {
                        tracing::warn!(key = %key, from = %source.name, to = %target.name, error = %e.chain().join(": "), "copy failed; trying the next repository");
                    }
                }
            }
            if copied {
                tracing::info!(key = %key, from = ?action.from, to = %target.name, "copied");
                report.actions.push(action);
            } else {
                report.failures.push(format!(
                    "backup {job}/{id}: unable to copy object '{}' into repository '{}': no other repository could provide an intact copy",
                    object.name, target.name
                ));
                target_failed = true;
            }
        }
        if target_failed {
            continue;
        }
        if !holding.manifest {
            let key = layout::manifest_key(job, id);
            if !options.dry_run {
                // The copy keeps its signature, written first as at the backup.
                if let Err(e) = target.copy_signature_from(manifest_source, &key).await {
                    report.failures.push(e.chain().join(": "));
                    continue;
                }
                let written = target
                    .store
                    .create_if_absent(&key, manifest_bytes.clone())
                    .await;
                if let Err(e) = written
                    && !matches!(e, storage::StoreError::AlreadyExists { .. })
                {
                    report.failures.push(
                        target
                            .error(&format!("write manifest '{key}'"), e)
                            .chain()
                            .join(": "),
                    );
                    continue;
                }
            }
            report.actions.push(Action {
                job: job.to_string(),
                id: id.to_string(),
                object: layout::MANIFEST_NAME.to_string(),
                bytes: manifest_bytes.len() as u64,
                from: Some(manifest_source.name.clone()),
                to: target.name.clone(),
                what: ActionKind::Copy,
            });
        }
        abort_open_uploads(job, id, target, options.dry_run, report).await;
    }
}

/// Aborts the uploads still open under a committed backup: interrupted attempts (a region
/// that went away mid-upload could not be told to abort then).
async fn abort_open_uploads(
    job: &str,
    id: &str,
    target: &Repository,
    dry_run: bool,
    report: &mut ReplicateReport,
) {
    let prefix = layout::backup_prefix(job, id);
    let Ok(open) = target.store.list_incomplete(&prefix).await else {
        return;
    };
    for upload in open {
        if !dry_run && let Err(e) = target.store.abort_incomplete(&upload).await {
            report.failures.push(
                target
                    .error(&format!("abort the upload of '{}'", upload.key), e)
                    .chain()
                    .join(": "),
            );
            continue;
        }
        report.actions.push(Action {
            job: job.to_string(),
            id: id.to_string(),
            object: upload
                .key
                .rsplit('/')
                .next()
                .unwrap_or_default()
                .to_string(),
            bytes: 0,
            from: None,
            to: target.name.clone(),
            what: ActionKind::AbortUpload,
        });
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

/// Streams `key` from `source` into `target`, checking its size and sha256 on the way; the
/// upload is finished only if they match, so `target` never commits a damaged copy.
async fn copy_object(
    source: &Repository,
    target: &Repository,
    key: &str,
    object: &ObjectEntry,
) -> Result<()> {
    let mut stream = source
        .store
        .get(key, None)
        .await
        .map_err(|e| source.error(&format!("read object '{key}'"), e))?;
    let (sender, parts) = PartStream::channel(CHANNEL_BOUND);
    let store = target.store.clone();
    let owned_key = key.to_string();
    let upload = tokio::spawn(async move { store.put(&owned_key, parts).await });
    let mut tally = Tally::default();
    let mut read_error = None;
    while let Some(chunk) = stream.next().await {
        match chunk {
            Ok(chunk) => {
                tally.update(&chunk);
                if sender.send(chunk).await.is_err() {
                    break;
                }
            }
            Err(e) => {
                read_error = Some(source.error(&format!("read object '{key}'"), e));
                break;
            }
        }
    }
    let checked = match read_error {
        Some(e) => Err(e),
        None => {
            let (size, sha256) = tally.finish();
            if size == object.size && sha256 == object.sha256 {
                Ok(())
            } else {
                Err(Error::new(
                    ErrorKind::Verification,
                    format!(
                        "damaged object '{key}' in repository '{}': stored sha256 is {sha256} ({size} bytes), the manifest says {} ({} bytes)",
                        source.name, object.sha256, object.size
                    ),
                ))
            }
        }
    };
    if checked.is_ok() {
        // Only an explicit finish commits the upload; dropping the sender aborts it.
        let _ = sender.finish().await;
    } else {
        drop(sender);
    }
    let stored = upload.await.map_err(|e| {
        Error::new(
            ErrorKind::Storage,
            format!("unable to copy '{key}' into '{}'", target.name),
        )
        .with_source(e)
    })?;
    checked?;
    stored
        .map(|_| ())
        .map_err(|e| target.error(&format!("store object '{key}'"), e))
}

impl fmt::Display for ReplicateReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let verb = |kind: ActionKind| match (self.dry_run, kind) {
            (false, ActionKind::Copy) => "copied",
            (false, ActionKind::Replace) => "replaced damaged",
            (false, ActionKind::AbortUpload) => "aborted open upload of",
            (true, ActionKind::Copy) => "would copy",
            (true, ActionKind::Replace) => "would replace damaged",
            (true, ActionKind::AbortUpload) => "would abort open upload of",
        };
        for action in &self.actions {
            let from = action
                .from
                .as_ref()
                .map(|from| format!(" from '{from}'"))
                .unwrap_or_default();
            writeln!(
                f,
                "{} {}/{}/{} ({}){from} into '{}'",
                verb(action.what),
                action.job,
                action.id,
                crate::error::escape_controls(&action.object),
                human_size(action.bytes),
                action.to
            )?;
        }
        for (name, marked) in &self.reseeded {
            match (marked, self.dry_run) {
                (true, _) => writeln!(f, "reseeded repository '{name}': marker written")?,
                (false, true) => {
                    writeln!(f, "would reseed repository '{name}' and write its marker")?
                }
                (false, false) => writeln!(
                    f,
                    "repository '{name}' not reseeded whole: its marker was not written (see the failures above; a 'lifeboat.json' that is not lifeboat's must be looked at and removed by hand); then run `lifeboat replicate --reseed` again"
                )?,
            }
        }
        for ignored in &self.ignored_records {
            writeln!(f, "warning: removal record {ignored}")?;
        }
        for skipped in &self.not_copied {
            writeln!(f, "{}/{}: {}", skipped.job, skipped.id, skipped.why)?;
        }
        for failure in &self.failures {
            writeln!(f, "failed: {failure}")?;
        }
        for (name, reason) in &self.unreachable {
            writeln!(
                f,
                "warning: repository '{name}' could not be listed: {reason}"
            )?;
        }
        if self.actions.is_empty() && self.failures.is_empty() && self.not_copied.is_empty() {
            writeln!(
                f,
                "nothing to copy: every reachable repository holds every backup"
            )?;
        }
        Ok(())
    }
}
