//! Restoring a `files` backup: fetch, verify and unpack into staging beside the target
//! directory, then move into place. The target must be new or empty: lifeboat never
//! overwrites files in place.

use std::path::{Path, PathBuf};

use super::{ExtractSummary, RestoreReport, Selected, extract};
use crate::commands::backup::FILES_OBJECT;
use crate::error::{Error, ErrorKind, Result};
use crate::transfer::read_object;

pub(super) async fn restore(selected: Selected, into: &Path) -> Result<RestoreReport> {
    check_target(into)?;
    let started = std::time::Instant::now();
    let summary = unpack(&selected, FILES_OBJECT, into).await?;
    let target = format!("'{}'", into.display());
    Ok(selected.report(
        target,
        vec![format!("{} entries", summary.entries)],
        summary.bytes,
        Vec::new(),
        vec![("download, verify and unpack".to_string(), started.elapsed())],
    ))
}

/// Unpacks the tar object `name` of the selected backup into staging beside `into`, then
/// moves it into place once both checksums matched. A fresh staging directory per
/// repository tried: a copy that fails halfway leaves nothing for the next to trip over.
pub(super) async fn unpack(selected: &Selected, name: &str, into: &Path) -> Result<ExtractSummary> {
    let manifest = &selected.manifest;
    let object = manifest
        .objects
        .iter()
        .find(|o| o.logical_name() == name)
        .cloned()
        .ok_or_else(|| {
            Error::new(
                ErrorKind::Verification,
                format!(
                    "unable to restore backup '{}/{}': its manifest has no object '{name}'",
                    manifest.job, manifest.id
                ),
            )
        })?;
    let parent = parent_of(into);
    std::fs::create_dir_all(&parent).map_err(|e| target_error(into, e))?;
    let (staging, summary) = selected
        .read_from_any(name, async |repository| {
            let staging = tempfile::Builder::new()
                .prefix(".lifeboat-restore-")
                .tempdir_in(&parent)
                .map_err(|e| target_error(into, e))?;
            crate::interrupt::remove_on_interrupt(staging.path());
            let staging_root = staging.path().to_path_buf();
            let summary = read_object(
                repository,
                manifest,
                &object,
                &selected.keyring,
                move |raw| extract::extract(raw, &staging_root),
            )
            .await
            .map_err(|e| match e.kind() {
                // Writing failed, not reading: say where it was writing.
                crate::error::ErrorKind::Target => e.with_hint(format!(
                    "it was being unpacked under '{}' (removed again); free space or choose another --into",
                    staging.path().display()
                )),
                _ => e,
            });
            if summary.is_err() {
                crate::interrupt::forget(staging.path());
            }
            Ok((staging, summary?))
        })
        .await?;
    let moved = move_into_place(staging.path(), into).map_err(|e| target_error(into, e));
    crate::interrupt::forget(staging.path());
    moved?;
    Ok(summary)
}

fn parent_of(path: &Path) -> PathBuf {
    match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

pub(super) fn target_error(into: &Path, err: std::io::Error) -> Error {
    Error::new(
        ErrorKind::Target,
        format!("unable to restore into '{}'", into.display()),
    )
    .with_source(err)
}

pub(super) fn check_target(into: &Path) -> Result<()> {
    match std::fs::symlink_metadata(into) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(target_error(into, e)),
        Ok(meta) if !meta.is_dir() => Err(Error::new(
            ErrorKind::Target,
            format!(
                "unable to restore into '{}': it exists and is not a directory",
                into.display()
            ),
        )),
        Ok(_) => {
            let mut entries = std::fs::read_dir(into).map_err(|e| target_error(into, e))?;
            if entries.next().is_some() {
                return Err(Error::new(
                    ErrorKind::Target,
                    format!("unable to restore into '{}': the directory is not empty", into.display()),
                )
                .with_hint("restore into a new or empty directory, compare, then copy what you need into place"));
            }
            Ok(())
        }
    }
}

fn move_into_place(staging: &Path, into: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(into)?;
    for entry in std::fs::read_dir(staging)? {
        let entry = entry?;
        std::fs::rename(entry.path(), into.join(entry.file_name()))?;
    }
    Ok(())
}
