//! Restoring a tar object (a `files` backup, a base backup) into a directory: the stored
//! object is downloaded into a private staging directory *inside* the target and its sha256
//! checked there, before a byte of it is decoded; then it is decoded and unpacked beneath the
//! staging directory (never through a symlink), its raw sha256 checked at the end, and only
//! then moved into place. A damaged or forged object changes nothing anywhere, and staging
//! inside the target means no rename crosses a filesystem (a freshly mounted volume) and
//! whoever may write the target may restore into it (`postgres` into its own directory).
//! The target must be new or empty: lifeboat never overwrites files in place.

use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use super::extract::{Beneath, Ownership};
use super::staging::{HIDDEN_PREFIX, Staging, remove_leftovers};
use super::{ExtractSummary, RestoreReport, Selected, extract};
use crate::commands::backup::FILES_OBJECT;
use crate::error::{Error, ErrorKind, Result};
use crate::transfer::{StagedObject, download_object};

pub(super) async fn restore(selected: Selected, into: &Path) -> Result<RestoreReport> {
    let target = Target::prepare(into)?;
    let started = std::time::Instant::now();
    let summary = target
        .undo_on_error(unpack(
            &selected,
            FILES_OBJECT,
            &target,
            Ownership::for_this_user(),
        ))
        .await?;
    let target_name = format!("'{}'", into.display());
    let warnings = target.warnings();
    Ok(selected.report(
        target_name,
        vec![format!("{} entries", summary.entries)],
        summary.bytes,
        warnings,
        vec![("download, verify and unpack".to_string(), started.elapsed())],
    ))
}

/// A restore's target directory, new or empty, and what preparing it did.
pub(super) struct Target {
    pub(super) path: PathBuf,
    /// Whether this restore made it (and removes it again when it fails).
    created: bool,
    /// Staging directories of interrupted restores that were removed from it.
    leftovers: Vec<PathBuf>,
}

impl Target {
    /// Checks that `into` is a new or empty directory (but for the staging of restores that
    /// were stopped before they ended, which it removes), then makes it.
    pub(super) fn prepare(into: &Path) -> Result<Target> {
        let leftovers = match std::fs::symlink_metadata(into) {
            Ok(meta) if meta.is_dir() => remove_leftovers(into, HIDDEN_PREFIX),
            _ => Vec::new(),
        };
        for removed in &leftovers {
            tracing::warn!(path = %removed.display(), "removed the staging directory of a restore that was stopped before it ended");
        }
        let created = check_target(into)?;
        if created {
            std::fs::create_dir_all(into).map_err(|e| target_error(into, e))?;
        }
        Ok(Target {
            path: into.to_path_buf(),
            created,
            leftovers,
        })
    }

    /// Runs `work`; when it fails, a target this restore made is removed again if empty.
    pub(super) async fn undo_on_error<T>(
        &self,
        work: impl std::future::Future<Output = Result<T>>,
    ) -> Result<T> {
        let outcome = work.await;
        if outcome.is_err() && self.created {
            let _ = std::fs::remove_dir(&self.path);
        }
        outcome
    }

    pub(super) fn warnings(&self) -> Vec<String> {
        self.leftovers
            .iter()
            .map(|path| {
                format!(
                    "removed '{}', the staging directory of a restore that was stopped before it ended",
                    path.display()
                )
            })
            .collect()
    }
}

/// Unpacks the tar object `name` of the selected backup into `target`, with the files
/// owned as `ownership` says. A fresh staged copy per repository tried: one that fails
/// halfway leaves nothing for the next to trip over.
pub(super) async fn unpack(
    selected: &Selected,
    name: &str,
    target: &Target,
    ownership: Ownership,
) -> Result<ExtractSummary> {
    let into = &target.path;
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
    let staging = Staging::inside(into, object.size.saturating_add(object.raw_size))?;
    let stored = staging.path(&object.name);
    let tree = staging.path("tree");
    let unpacked = selected
        .read_from_any(name, async |repository| {
            // What an earlier repository's copy left.
            for removed in [std::fs::remove_file(&stored), std::fs::remove_dir_all(&tree)] {
                match removed {
                    Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                        return Err(target_error(into, e));
                    }
                    _ => {}
                }
            }
            download_object(repository, manifest, &object, &stored).await?;
            std::fs::DirBuilder::new()
                .mode(0o700)
                .create(&tree)
                .map_err(|e| target_error(into, e))?;
            let beneath = Beneath::open(&tree).map_err(|e| target_error(into, e))?;
            let (repository, manifest, object) =
                (repository.clone(), manifest.clone(), object.clone());
            let (keyring, stored) = (selected.keyring.clone(), stored.clone());
            tokio::task::spawn_blocking(move || {
                let staged = StagedObject {
                    path: &stored,
                    repository: &repository,
                    manifest: &manifest,
                    object: &object,
                    keyring: &keyring,
                };
                staged.decode(|raw| extract::unpack(raw, &beneath, ownership))
            })
            .await
            .map_err(|e| {
                Error::new(
                    ErrorKind::Target,
                    format!("unable to restore into '{}'", into.display()),
                )
                .with_source(e)
            })?
        })
        .await
        .map_err(|e| match e.kind() {
            // Writing failed, not reading: say where it was writing.
            ErrorKind::Target => e.with_hint(format!(
                "it was being unpacked under '{}' (removed again); free space or choose another target",
                staging.dir().display()
            )),
            _ => e,
        })?;
    let relative = staging
        .dir()
        .strip_prefix(into)
        .expect("staging is inside the target")
        .join("tree");
    let placed = Beneath::open(into).and_then(|root| {
        root.move_up(&relative)?;
        unpacked.finish(&root)
    });
    placed.map_err(|e| target_error(into, e))
}

pub(super) fn target_error(into: &Path, err: std::io::Error) -> Error {
    Error::new(
        ErrorKind::Target,
        format!("unable to restore into '{}'", into.display()),
    )
    .with_source(err)
}

/// Checks that `into` is new or an empty directory; true when it does not exist yet.
pub(super) fn check_target(into: &Path) -> Result<bool> {
    match std::fs::symlink_metadata(into) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(true),
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
            if let Some(entry) = entries.next() {
                let named = entry
                    .map(|e| format!(" (it holds '{}')", e.file_name().to_string_lossy()))
                    .unwrap_or_default();
                return Err(Error::new(
                    ErrorKind::Target,
                    format!("unable to restore into '{}': the directory is not empty{named}", into.display()),
                )
                .with_hint("restore into a new or empty directory, compare, then copy what you need into place"));
            }
            Ok(false)
        }
    }
}
