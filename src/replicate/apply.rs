//! A replicate plan carried out: each copy streams from the first source that gives it
//! intact (its sha256 checked on the way), and is committed only then.

use futures::StreamExt;

use super::plan::{
    BackupFill, JobCopies, SignatureCopy, WalCopy, holds_prune_record, is_signed_kind,
};
use super::{Action, NotCopied, ReplicateReport};
use crate::error::{Error, ErrorKind, Result};
use crate::layout;
use crate::manifest::ObjectEntry;
use crate::pipeline::{CHANNEL_BOUND, Tally};
use crate::repository::Repository;
use crate::storage::{self, PartStream};

/// Carries out one job's copies, recording each done action and each failure in `report`.
pub(super) async fn apply(job: &str, copies: JobCopies, report: &mut ReplicateReport) {
    for fill in &copies.backups {
        let span = tracing::info_span!("replicate", job = %job, backup = %fill.id);
        tracing::Instrument::instrument(fill_backup(fill, report), span).await;
    }
    for copy in &copies.signatures {
        copy_signature(copy, report).await;
    }
    for copy in &copies.wal {
        copy_wal_file(copy, report).await;
    }
}

/// The objects, then the manifest, then the open uploads of one backup in one repository.
/// An object that cannot be copied leaves the manifest and the uploads alone (the other
/// objects still go in).
async fn fill_backup(fill: &BackupFill, report: &mut ReplicateReport) {
    let (job, id, target) = (&fill.job, &fill.id, &fill.target);
    let mut actions = fill.actions().into_iter();
    let mut failed = false;
    for copy in &fill.objects {
        let mut action = actions.next().expect("an action per object");
        let key = layout::object_key(job, id, &copy.object.name);
        let mut copied = false;
        for source in &copy.sources {
            match copy_object(source, target, &key, &copy.object).await {
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
        if !copied {
            report.failures.push(format!(
                "backup {job}/{id}: unable to copy object '{}' into repository '{}': no other repository could provide an intact copy",
                copy.object.name, target.name
            ));
            // The other objects still go in; the manifest does not.
            failed = true;
            continue;
        }
        tracing::info!(key = %key, from = ?action.from, to = %target.name, "copied");
        report.actions.push(action);
    }
    if failed {
        return;
    }
    if let Some(copy) = &fill.manifest {
        let action = actions.next().expect("an action for the manifest");
        let key = layout::manifest_key(job, id);
        // A prune elsewhere may have let it go since the plan was made (it records that
        // before it removes anything): the copy must not bring it back.
        if !fill.record_ignored
            && let Some(record) = removed_since(fill, &copy.source).await
        {
            report.not_copied.push(NotCopied {
                job: job.clone(),
                id: id.clone(),
                why: format!(
                    "not copied into '{}': prune removed it while replicate ran (record in '{record}'); what was copied of it is left for prune",
                    target.name
                ),
            });
            return;
        }
        // The copy keeps its signature, written first as at the backup.
        if let Err(e) = target.copy_signature_from(&copy.source, &key).await {
            report.failures.push(e.chain().join(": "));
            return;
        }
        let written = target
            .store
            .create_if_absent(&key, copy.bytes.clone())
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
            return;
        }
        report.actions.push(action);
    }
    for (upload, action) in fill.open_uploads.iter().zip(actions) {
        match target.store.abort_incomplete(upload).await {
            Ok(()) => report.actions.push(action),
            Err(e) => report.failures.push(
                target
                    .error(&format!("abort the upload of '{}'", upload.key), e)
                    .chain()
                    .join(": "),
            ),
        }
    }
}

/// The repository (the target, or the manifest's source) holding a removal record of the
/// backup `fill` fills in that prune could have written, if one does: by the rules
/// planning judges records by, not one naming the job's newest backup (prune never removes
/// it) nor one dated before the backup was made.
async fn removed_since(fill: &BackupFill, source: &Repository) -> Option<String> {
    if fill.newest {
        return None;
    }
    for repository in [&fill.target, source] {
        if holds_prune_record(repository, &fill.job, &fill.id).await {
            return Some(repository.name.clone());
        }
    }
    None
}

async fn copy_signature(copy: &SignatureCopy, report: &mut ReplicateReport) {
    if let Err(e) = copy
        .target
        .copy_signature_from(&copy.source, &copy.key)
        .await
    {
        report.failures.push(e.chain().join(": "));
    }
}

async fn copy_wal_file(copy: &WalCopy, report: &mut ReplicateReport) {
    let mut action: Action = copy.action();
    let mut last_error = None;
    for source in &copy.sources {
        match copy_wal(source, &copy.target, &copy.key).await {
            Ok(()) => {
                action.from = Some(source.name.clone());
                report.actions.push(action);
                return;
            }
            Err(e) => {
                tracing::warn!(key = %copy.key, from = %source.name, to = %copy.target.name, error = %e.chain().join(": "), "WAL copy failed; trying the next repository");
                last_error = Some(e.chain().join(": "));
            }
        }
    }
    report.failures.push(format!(
        "WAL {}/{}: unable to copy it into repository '{}': {}",
        copy.job,
        crate::error::escape_controls(&action.object),
        copy.target.name,
        last_error.unwrap_or_else(|| "no other repository holds it".to_string())
    ));
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
