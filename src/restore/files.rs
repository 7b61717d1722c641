//! Restoring a tar object (a `files` backup, a base backup) into a directory. The target is
//! opened once, never through a symlink in its place, and everything after happens beneath
//! that handle: the stored object is downloaded into a private staging directory *inside*
//! the target and checked there, before a byte of it is decoded: each stretch is decoded and
//! unpacked beneath the staging directory (never through a symlink) once it matched its block
//! digest, while the rest still downloads (an object without them, once its whole sha256
//! matched); the raw sha256 is checked at the end, and only then is the tree moved into
//! place. A damaged or forged object changes nothing anywhere, and staging inside the target
//! means no rename crosses a filesystem (a freshly mounted volume) and whoever may write the
//! target may restore into it (`postgres` into its own directory). The target must be new or empty: lifeboat never
//! overwrites files in place.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use super::extract::{Beneath, Ownership};
use super::staging::{HIDDEN_PREFIX, Staging, contents, remove_abandoned, remove_tree_at};
use super::{ExtractSummary, RestoreReport, Selected, extract};
use crate::error::{Error, ErrorKind, Result};
use crate::layout::FILES_OBJECT;
use crate::pipeline;
use crate::transfer::{StagedObject, StoredObject};

pub(super) async fn restore(selected: Selected, into: &Path) -> Result<RestoreReport> {
    let target = Target::prepare(into)?;
    let started = std::time::Instant::now();
    let (summary, transfer) = target
        .undo_on_error(unpack(
            &selected,
            FILES_OBJECT,
            &target,
            Ownership::for_this_user(),
        ))
        .await?;
    let target_name = format!("'{}'", into.display());
    let mut warnings = target.warnings();
    let source = &selected.manifest.source;
    if let Some(count) = source.not_stored {
        warnings.push(crate::manifest::describe_not_stored(
            count,
            &source.not_stored_entries,
        ));
    }
    warnings.extend(summary.attributes_not_restored());
    let mut report = selected.report(
        target_name,
        vec![format!("{} entries", summary.entries)],
        summary.bytes,
        warnings,
        vec![("download, verify and unpack".to_string(), started.elapsed())],
    );
    report.transfer = Some(transfer);
    Ok(report)
}

/// A restore's target directory, new or empty, held open, and what preparing it did.
pub(super) struct Target {
    pub(super) path: PathBuf,
    pub(super) dir: Beneath,
    /// Whether this restore made it (and removes it again when it fails).
    created: bool,
    /// What interrupted restores left in it, removed: their staging directories, and the
    /// entries they had moved into place.
    leftovers: Vec<PathBuf>,
    /// The entries this restore moved into it, removed again when it fails.
    moved: std::sync::Mutex<Vec<OsString>>,
}

impl Target {
    /// Makes `into` when it is missing, opens it (refusing a symlink in its place), and
    /// checks that it is empty but for an empty `lost+found` (a freshly made filesystem's)
    /// and the staging of restores that were stopped before they ended, which it removes.
    pub(super) fn prepare(into: &Path) -> Result<Target> {
        // A directory this restore makes is removed again if the run is interrupted before
        // its tree is in place; registered under the guard, so no signal falls in between.
        let Some(creating) = crate::interrupt::creating() else {
            return Err(target_error(
                into,
                std::io::Error::new(
                    std::io::ErrorKind::Interrupted,
                    "the run is being interrupted",
                ),
            ));
        };
        let created = match std::fs::create_dir(into) {
            Ok(()) => true,
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => false,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                std::fs::create_dir_all(into).map_err(|e| target_error(into, e))?;
                true
            }
            Err(e) => return Err(target_error(into, e)),
        };
        if created {
            crate::interrupt::remove_on_interrupt(into);
        }
        drop(creating);
        let dir = Beneath::open_target(into).map_err(|e| {
            // O_NOFOLLOW|O_DIRECTORY on a symlink says ELOOP or ENOTDIR, as the kernel likes.
            let is_symlink =
                std::fs::symlink_metadata(into).is_ok_and(|m| m.file_type().is_symlink());
            let err = match e.raw_os_error() {
                Some(libc::ELOOP | libc::ENOTDIR) if is_symlink => Error::new(
                    ErrorKind::Target,
                    format!(
                        "unable to restore into '{}': it is a symlink",
                        into.display()
                    ),
                )
                .with_hint("name the directory it points to"),
                Some(libc::ENOTDIR) => Error::new(
                    ErrorKind::Target,
                    format!(
                        "unable to restore into '{}': it exists and is not a directory",
                        into.display()
                    ),
                ),
                _ => target_error(into, e),
            };
            if created {
                let _ = std::fs::remove_dir(into);
                crate::interrupt::forget(into);
            }
            err
        })?;
        let target = Target {
            path: into.to_path_buf(),
            dir,
            created,
            leftovers: Vec::new(),
            moved: Default::default(),
        };
        // One restore at a time into one directory: two that both found it empty would
        // mix their trees. The lock goes with the process, however it ends.
        if rustix::fs::flock(
            target.dir.fd(),
            rustix::fs::FlockOperation::NonBlockingLockExclusive,
        )
        .is_err()
        {
            return Err(Error::new(
                ErrorKind::Target,
                format!(
                    "unable to restore into '{}': another restore into it is running",
                    into.display()
                ),
            ));
        }
        let found = contents(target.dir.fd(), HIDDEN_PREFIX).map_err(|e| target_error(into, e))?;
        if let Some(name) = found.other.first() {
            return Err(Error::new(
                ErrorKind::Target,
                format!(
                    "unable to restore into '{}': the directory is not empty (it holds '{}')",
                    into.display(),
                    name.to_string_lossy().escape_debug()
                ),
            )
            .with_hint(
                "restore into a new or empty directory, compare, then copy what you need into place",
            ));
        }
        if let Some(name) = found.running.first() {
            return Err(Error::new(
                ErrorKind::Target,
                format!(
                    "unable to restore into '{}': it holds the staging directory '{}' of a restore that is still running, or of another user's",
                    into.display(),
                    name.to_string_lossy()
                ),
            ));
        }
        let mut leftovers = Vec::new();
        for name in &found.partial {
            match remove_tree_at(target.dir.fd(), name) {
                Ok(()) => leftovers.push(into.join(name)),
                Err(e) => return Err(target_error(into, e)),
            }
        }
        leftovers.extend(remove_abandoned(
            target.dir.fd(),
            into,
            &found.abandoned,
            HIDDEN_PREFIX,
        ));
        for removed in &leftovers {
            tracing::warn!(path = %removed.display(), "removed the staging directory of a restore that was stopped before it ended");
        }
        Ok(Target {
            leftovers,
            ..target
        })
    }

    /// Runs `work`; when it fails, what this restore moved into the target is removed, and
    /// a target this restore made is removed again.
    pub(super) async fn undo_on_error<T>(
        &self,
        work: impl std::future::Future<Output = Result<T>>,
    ) -> Result<T> {
        let outcome = work.await;
        if outcome.is_err() {
            let moved = std::mem::take(&mut *self.moved.lock().expect("moved lock"));
            for name in moved {
                if let Err(e) = remove_tree_at(self.dir.fd(), &name) {
                    tracing::warn!(path = %self.path.join(&name).display(), error = %e, "unable to remove what the failed restore put in place");
                }
            }
            if self.created {
                let _ = std::fs::remove_dir(&self.path);
                crate::interrupt::forget(&self.path);
            }
        }
        outcome
    }

    pub(super) fn warnings(&self) -> Vec<String> {
        self.leftovers
            .iter()
            .map(|path| {
                format!(
                    "removed '{}', left by a restore that was stopped before it ended",
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
) -> Result<(ExtractSummary, crate::rto_model::Transfer)> {
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
    let staging = Staging::inside(
        target.dir.fd(),
        into,
        object.size.saturating_add(object.raw_size),
    )?;
    let staged_path = staging.path(&object.name);
    let unpacked = selected
        .read_from_any(name, async |repository| {
            // What an earlier repository's copy left.
            for name in [object.name.as_str(), TREE] {
                staging.remove(name).map_err(|e| target_error(into, e))?;
            }
            let file = staging.create_file(&object.name)?;
            let stored = StoredObject {
                repository,
                manifest,
                object: &object,
            };
            let staged = staging.open_file(&object.name)?;
            let tree = Beneath::create_at(staging.fd(), TREE, staging.path(TREE))
                .map_err(|e| target_error(into, e))?;
            // Unpacked while it downloads, never past what matched its block digests (the
            // whole of it, for an object without them).
            let checked = pipeline::Checked::default();
            let (stored_bytes, raw_bytes) = (object.size, object.raw_size);
            let (repository, manifest, object) =
                (repository.clone(), manifest.clone(), object.clone());
            let (keyring, staged_path) = (selected.keyring.clone(), staged_path.clone());
            let reader_checked = checked.clone();
            let unpacking = tokio::task::spawn_blocking(move || {
                let started = std::time::Instant::now();
                let staged_object = StagedObject {
                    path: &staged_path,
                    repository: &repository,
                    manifest: &manifest,
                    object: &object,
                    keyring: &keyring,
                };
                let unpacked = staged_object
                    .decode_following(staged, reader_checked.clone(), |raw| {
                        extract::unpack(raw, &tree, ownership)
                    })
                    .and_then(|mut unpacked| {
                        // Everything but the top directories, whose attributes would stop
                        // them from moving (a directory moves only while its owner may
                        // write it).
                        unpacked
                            .finish_nested(&tree)
                            .map_err(|e| target_error(tree.path(), e))?;
                        Ok(unpacked)
                    });
                if unpacked.is_err() {
                    reader_checked.abandon();
                }
                let busy = started.elapsed().saturating_sub(reader_checked.waited());
                unpacked.map(|unpacked| (unpacked, busy))
            });
            let downloaded = stored.download_checked(file, &checked).await;
            if downloaded.is_err() {
                // However the download ended (its thread may have died before it could say
                // so), the reader must not wait for more.
                checked.fail();
            }
            let unpacked = unpacking.await.map_err(|e| {
                Error::new(
                    ErrorKind::Target,
                    format!("unable to restore into '{}'", into.display()),
                )
                .with_source(e)
            })?;
            // A download that failed explains whatever the unpacking then said; one stopped
            // because the unpacking failed does not.
            match (downloaded, unpacked) {
                (Err(_), Err(unpacking)) if checked.is_abandoned() => Err(unpacking),
                (Err(e), _) => Err(e),
                (Ok(downloaded), unpacked) => unpacked.map(|(unpacked, busy)| {
                    let transfer = crate::rto_model::Transfer {
                        stored_bytes,
                        raw_bytes,
                        download_seconds: downloaded.seconds,
                        first_byte_seconds: downloaded.first_byte_seconds,
                        streams: downloaded.streams,
                        unpack_seconds: busy.as_secs_f64(),
                    };
                    (unpacked, transfer)
                }),
            }
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
    let (unpacked, transfer) = unpacked;
    let tree: PathBuf = [staging.name(), OsString::from(TREE).as_os_str()]
        .iter()
        .collect();
    // An interrupt waits for the move and the last attributes: a few renames.
    let placed = {
        let _moving = crate::interrupt::hold_off();
        let mut moved = target.moved.lock().expect("moved lock");
        let placed = target
            .dir
            .move_up(&tree, |names| staging.write_journal(names), &mut moved)
            .and_then(|()| staging.close_journal())
            .and_then(|()| unpacked.finish(&target.dir));
        // The tree is in place: an interrupt from now on leaves it there.
        if placed.is_ok() {
            crate::interrupt::forget(&target.path);
        }
        placed
    };
    drop(staging);
    placed
        .map(|summary| (summary, transfer))
        .map_err(|e| target_error(into, e))
}

/// The staging directory's subdirectory that an object is unpacked into.
const TREE: &str = "tree";

pub(super) fn target_error(into: &Path, err: std::io::Error) -> Error {
    Error::new(
        ErrorKind::Target,
        format!("unable to restore into '{}'", into.display()),
    )
    .with_source(err)
}
