//! Local staging for restores: an object is downloaded and verified here before anything
//! reaches the target, either as stored (compressed, to be decoded into the target later) or
//! decompressed, for tools that need a seekable file (pg_restore loading tables in
//! parallel). The space is checked before anything is downloaded.
//!
//! A staging directory is private (0700) and locked (`flock`) while its restore runs. A
//! restore killed before it ended (SIGKILL, a power cut) leaves it behind, unlocked: the next
//! restore that stages in the same place removes it and says so.

use std::ffi::{OsStr, OsString};
use std::io::{BufWriter, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use rustix::fs::{AtFlags, FileType, FlockOperation, Mode, OFlags};
use rustix::io::Errno;

use super::extract::DIRECTORY;
use crate::error::{Error, ErrorKind, Result};
use crate::human::human_size;
use crate::keys::Keyring;
use crate::manifest::{Manifest, ObjectEntry};
use crate::repository::Repository;
use crate::transfer::StoredObject;

/// Room kept free beyond the staged bytes, so a restore does not fill the disk to the brim.
const MARGIN: u64 = 64 * 1024 * 1024;

/// The name of a staging directory starts with this: beside other files ($TMPDIR), or hidden
/// inside a restore's target, where an `ls` should not show it.
pub(super) const PREFIX: &str = "lifeboat-restore-";
pub(super) const HIDDEN_PREFIX: &str = ".lifeboat-restore-";
/// The file that marks a directory as lifeboat's staging, written once it is locked: a
/// directory without it is never taken for a leftover.
const MARKER: &str = ".lifeboat-staging";

/// A private (0700) directory for one restore's staged files, in a base directory held by a
/// handle: locked while the restore runs, removed (beneath the handle, never through a
/// symlink) when it ends.
pub(super) struct Staging {
    base: OwnedFd,
    name: OsString,
    /// The directory itself, open and locked.
    dir: OwnedFd,
    /// Where it is, for messages and for the tools given its files.
    path: PathBuf,
}

impl Drop for Staging {
    fn drop(&mut self) {
        if let Err(e) = remove_tree_at(self.base.as_fd(), &self.name) {
            tracing::warn!(path = %self.path.display(), error = %e, "unable to remove the staging directory");
        }
        crate::interrupt::forget(&self.path);
    }
}

/// Removes the directory `name` beneath `parent` and everything in it, never following a
/// symlink; directories this user may not enter are opened up first (a restore's tree can
/// hold mode-000 ones).
pub(super) fn remove_tree_at(parent: BorrowedFd<'_>, name: &OsStr) -> std::io::Result<()> {
    let dir = match rustix::fs::openat(parent, name, DIRECTORY, Mode::empty()) {
        Ok(fd) => fd,
        Err(Errno::NOENT) => return Ok(()),
        Err(Errno::NOTDIR) | Err(Errno::LOOP) => {
            return Ok(rustix::fs::unlinkat(parent, name, AtFlags::empty())?);
        }
        Err(Errno::ACCESS) => {
            let stat = rustix::fs::statat(parent, name, AtFlags::SYMLINK_NOFOLLOW)?;
            if FileType::from_raw_mode(stat.st_mode) != FileType::Directory {
                return Ok(rustix::fs::unlinkat(parent, name, AtFlags::empty())?);
            }
            rustix::fs::chmodat(parent, name, Mode::from_raw_mode(0o700), AtFlags::empty())?;
            rustix::fs::openat(parent, name, DIRECTORY, Mode::empty())?
        }
        Err(e) => return Err(e.into()),
    };
    // A read-only directory's entries cannot be removed: it is going anyway.
    let _ = rustix::fs::fchmod(&dir, Mode::from_raw_mode(0o700));
    let mut names = Vec::new();
    for entry in rustix::fs::Dir::read_from(&dir)? {
        let entry = entry?;
        let entry_name = entry.file_name();
        if entry_name != c"." && entry_name != c".." {
            let is_dir = entry.file_type() == FileType::Directory
                || (entry.file_type() == FileType::Unknown
                    && rustix::fs::statat(&dir, entry_name, AtFlags::SYMLINK_NOFOLLOW)
                        .is_ok_and(|s| FileType::from_raw_mode(s.st_mode) == FileType::Directory));
            names.push((
                OsStr::from_bytes(entry_name.to_bytes()).to_os_string(),
                is_dir,
            ));
        }
    }
    for (entry_name, is_dir) in names {
        if is_dir {
            remove_tree_at(dir.as_fd(), &entry_name)?;
        } else {
            match rustix::fs::unlinkat(&dir, &entry_name, AtFlags::empty()) {
                Ok(()) | Err(Errno::NOENT) => {}
                Err(e) => return Err(e.into()),
            }
        }
    }
    Ok(rustix::fs::unlinkat(parent, name, AtFlags::REMOVEDIR)?)
}

/// Whether the entry `name` of `base` is a staging directory of this user's that no running
/// restore holds: it carries the marker and its lock is free. Returns it opened, locked.
fn abandoned(base: BorrowedFd<'_>, name: &OsStr, prefix: &str) -> Option<OwnedFd> {
    if !name.to_string_lossy().starts_with(prefix) {
        return None;
    }
    let dir = rustix::fs::openat(base, name, DIRECTORY, Mode::empty()).ok()?;
    let stat = rustix::fs::fstat(&dir).ok()?;
    // SAFETY: geteuid has no preconditions.
    if stat.st_uid != unsafe { libc::geteuid() } {
        return None;
    }
    rustix::fs::flock(&dir, FlockOperation::NonBlockingLockExclusive).ok()?;
    let marker = rustix::fs::statat(&dir, MARKER, AtFlags::SYMLINK_NOFOLLOW).ok()?;
    (FileType::from_raw_mode(marker.st_mode) == FileType::RegularFile).then_some(dir)
}

/// The file in a staging directory that lists, NUL-separated, the entries its restore is
/// moving into the target: a restore killed while moving left those half in place.
const JOURNAL: &str = "moving";

/// The names the journal of the staging directory `dir` lists, if it has one.
fn journal_names(dir: BorrowedFd<'_>) -> Vec<OsString> {
    use std::io::Read;
    let Ok(fd) = rustix::fs::openat(
        dir,
        JOURNAL,
        OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    ) else {
        return Vec::new();
    };
    let mut text = Vec::new();
    if std::fs::File::from(fd)
        .take(64 << 20)
        .read_to_end(&mut text)
        .is_err()
    {
        return Vec::new();
    }
    text.split(|b| *b == 0)
        .filter(|name| !name.is_empty())
        .map(|name| OsStr::from_bytes(name).to_os_string())
        .collect()
}

/// What a directory holds, by kind, for deciding whether a restore may use it.
pub(super) struct Contents {
    /// Staging directories of restores that were stopped before they ended.
    pub(super) abandoned: Vec<OsString>,
    /// Entries such a restore had moved into place when it was stopped.
    pub(super) partial: Vec<OsString>,
    /// Staging directories of restores still running.
    pub(super) running: Vec<OsString>,
    /// Anything else, but an empty `lost+found` (a freshly made filesystem's).
    pub(super) other: Vec<OsString>,
}

/// Sorts what the directory `base` holds.
pub(super) fn contents(base: BorrowedFd<'_>, prefix: &str) -> std::io::Result<Contents> {
    let mut contents = Contents {
        abandoned: Vec::new(),
        partial: Vec::new(),
        running: Vec::new(),
        other: Vec::new(),
    };
    let listing = rustix::fs::openat(base, ".", DIRECTORY, Mode::empty())?;
    let mut names = Vec::new();
    for entry in rustix::fs::Dir::read_from(&listing)? {
        let entry = entry?;
        let name = entry.file_name();
        if name != c"." && name != c".." {
            names.push(OsStr::from_bytes(name.to_bytes()).to_os_string());
        }
    }
    let mut moved = std::collections::HashSet::new();
    for name in &names {
        if let Some(dir) = abandoned(base, name, prefix) {
            moved.extend(journal_names(dir.as_fd()));
            contents.abandoned.push(name.clone());
        }
    }
    // A restore never moves a filesystem's own lost+found: whatever a journal says.
    moved.remove(OsStr::new("lost+found"));
    for name in names {
        if contents.abandoned.contains(&name) {
            continue;
        }
        if moved.contains(&name) {
            contents.partial.push(name);
        } else if name.to_string_lossy().starts_with(prefix)
            && rustix::fs::openat(base, &name, DIRECTORY, Mode::empty()).is_ok_and(|dir| {
                rustix::fs::statat(&dir, MARKER, AtFlags::SYMLINK_NOFOLLOW).is_ok()
            })
        {
            contents.running.push(name);
        } else if name == "lost+found" && is_empty_directory(base, &name) {
            continue;
        } else {
            contents.other.push(name);
        }
    }
    Ok(contents)
}

fn is_empty_directory(base: BorrowedFd<'_>, name: &OsStr) -> bool {
    let Ok(dir) = rustix::fs::openat(base, name, DIRECTORY, Mode::empty()) else {
        return false;
    };
    let Ok(entries) = rustix::fs::Dir::read_from(&dir) else {
        return false;
    };
    entries
        .filter_map(|e| e.ok())
        .all(|e| e.file_name() == c"." || e.file_name() == c"..")
}

/// Removes the abandoned staging directories `names` of `base` (at `base_path`), returning
/// the paths it removed. One it cannot remove is left, with a warning.
pub(super) fn remove_abandoned(
    base: BorrowedFd<'_>,
    base_path: &Path,
    names: &[OsString],
    prefix: &str,
) -> Vec<PathBuf> {
    let mut removed = Vec::new();
    for name in names {
        // Taken again: another restore may have claimed it since.
        let Some(_lock) = abandoned(base, name, prefix) else {
            continue;
        };
        let path = base_path.join(name);
        match remove_tree_at(base, name) {
            Ok(()) => removed.push(path),
            Err(e) => tracing::warn!(
                path = %path.display(),
                error = %e,
                "unable to remove the staging directory of an interrupted restore"
            ),
        }
    }
    removed
}

/// Creates a private staging directory in `base` (at `base_path`) named `prefix` and a
/// unique suffix, locks it, then marks it as staging.
fn create_locked(base: BorrowedFd<'_>, base_path: &Path, prefix: &str) -> std::io::Result<Staging> {
    let base = base.try_clone_to_owned()?;
    // Held from the mkdir until the directory is registered: a signal in between would
    // otherwise leave it behind.
    let Some(_creating) = crate::interrupt::creating() else {
        return Err(std::io::Error::new(
            std::io::ErrorKind::Interrupted,
            "the run is being interrupted",
        ));
    };
    for attempt in 0u32.. {
        let unique = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0)
            ^ std::process::id().rotate_left(16)
            ^ attempt.wrapping_mul(0x9e37_79b9);
        let name = OsString::from(format!("{prefix}{unique:08x}"));
        match rustix::fs::mkdirat(&base, &name, Mode::from_raw_mode(0o700)) {
            Ok(()) => {}
            Err(Errno::EXIST) if attempt < 100 => continue,
            Err(e) => return Err(e.into()),
        }
        let path = base_path.join(&name);
        crate::interrupt::remove_on_interrupt(&path);
        let dir = rustix::fs::openat(&base, &name, DIRECTORY, Mode::empty())?;
        rustix::fs::flock(&dir, FlockOperation::LockExclusive)?;
        // The umask may have narrowed it; nobody else ever may read what is staged.
        rustix::fs::fchmod(&dir, Mode::from_raw_mode(0o700))?;
        rustix::fs::openat(
            &dir,
            MARKER,
            OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::from_raw_mode(0o600),
        )?;
        return Ok(Staging {
            base,
            name,
            dir,
            path,
        });
    }
    unreachable!("the loop returns or fails")
}

fn free_bytes(dir: BorrowedFd<'_>) -> std::io::Result<u64> {
    let stat = rustix::fs::fstatvfs(dir)?;
    Ok(stat.f_bavail.saturating_mul(stat.f_frsize))
}

/// Refuses, before anything is downloaded, a staging filesystem without room for `needed`
/// bytes and the margin, saying how much is needed and how much there is.
fn check_room(base: &Path, free: u64, needed: u64) -> Result<()> {
    check_room_with(base, free, needed, MARGIN).map_err(|e| {
        e.with_hint("free space there, or pass --staging-dir DIR on a filesystem with room")
    })
}

fn check_room_with(base: &Path, free: u64, needed: u64, margin: u64) -> Result<()> {
    if free >= needed + margin {
        return Ok(());
    }
    let needs = if margin == 0 {
        human_size(needed)
    } else {
        format!(
            "{} ({} of dumps plus {} to spare)",
            human_size(needed + margin),
            human_size(needed),
            human_size(margin)
        )
    };
    Err(Error::new(
        ErrorKind::Target,
        format!(
            "unable to stage the restore in '{}': it needs {needs} and {} is free",
            base.display(),
            human_size(free)
        ),
    ))
}

impl Staging {
    /// A private directory under `requested` (else $TMPDIR, else /var/tmp) with room for
    /// `needed` bytes. Staging directories of stopped restores found there are removed.
    pub(super) fn prepare(requested: Option<&Path>, needed: u64) -> Result<Staging> {
        let base_path = match requested {
            Some(dir) => dir.to_path_buf(),
            None => std::env::var_os("TMPDIR")
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from("/var/tmp")),
        };
        let error = |message: String| Error::new(ErrorKind::Target, message);
        let unusable = |e: std::io::Error| {
            error(format!(
                "unable to use staging directory '{}'",
                base_path.display()
            ))
            .with_source(e)
        };
        let base = rustix::fs::open(
            &base_path,
            OFlags::DIRECTORY | OFlags::RDONLY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| unusable(e.into()))?;
        let free = free_bytes(base.as_fd()).map_err(unusable)?;
        check_room(&base_path, free, needed)?;
        if let Ok(found) = contents(base.as_fd(), PREFIX) {
            for removed in remove_abandoned(base.as_fd(), &base_path, &found.abandoned, PREFIX) {
                tracing::warn!(path = %removed.display(), "removed the staging directory of a restore that was stopped before it ended");
            }
        }
        create_locked(base.as_fd(), &base_path, PREFIX).map_err(|e| {
            error(format!(
                "unable to create a staging directory in '{}'",
                base_path.display()
            ))
            .with_source(e)
        })
    }

    /// A private directory inside a restore's target, held by `target` (at `target_path`),
    /// so that nothing crosses a filesystem and whoever may write the target may stage there,
    /// with room for `needed` bytes.
    pub(super) fn inside(
        target: BorrowedFd<'_>,
        target_path: &Path,
        needed: u64,
    ) -> Result<Staging> {
        let failed = |e: std::io::Error| {
            Error::new(
                ErrorKind::Target,
                format!("unable to restore into '{}'", target_path.display()),
            )
            .with_source(e)
        };
        let free = free_bytes(target).map_err(failed)?;
        check_room_with(target_path, free, needed, 0).map_err(|e| {
            e.with_hint("free space there, or restore into a directory on a filesystem with room")
        })?;
        create_locked(target, target_path, HIDDEN_PREFIX).map_err(|e| {
            Error::new(
                ErrorKind::Target,
                format!(
                    "unable to create a staging directory in '{}'",
                    target_path.display()
                ),
            )
            .with_source(e)
        })
    }

    /// The staging directory, held.
    pub(super) fn fd(&self) -> BorrowedFd<'_> {
        self.dir.as_fd()
    }

    /// Its name in the directory it was made in.
    pub(super) fn name(&self) -> &OsStr {
        &self.name
    }

    /// The staging directory's path, for messages.
    pub(super) fn dir(&self) -> &Path {
        &self.path
    }

    /// A new file `name` in the staging directory, readable by this user alone, open to read
    /// and write.
    pub(super) fn create_file(&self, name: &str) -> Result<std::fs::File> {
        rustix::fs::openat(
            &self.dir,
            name,
            OFlags::RDWR | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::from_raw_mode(0o600),
        )
        .map(std::fs::File::from)
        .map_err(|e| {
            Error::new(
                ErrorKind::Target,
                format!(
                    "unable to create staging file '{}'",
                    self.path(name).display()
                ),
            )
            .with_source(std::io::Error::from(e))
        })
    }

    /// Opens the staged file `name` for reading.
    pub(super) fn open_file(&self, name: &str) -> Result<std::fs::File> {
        rustix::fs::openat(
            &self.dir,
            name,
            OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map(std::fs::File::from)
        .map_err(|e| {
            Error::new(
                ErrorKind::Target,
                format!(
                    "unable to open staging file '{}'",
                    self.path(name).display()
                ),
            )
            .with_source(std::io::Error::from(e))
        })
    }

    /// Notes the entries about to be moved into the target, for the restore after this one
    /// should this one be killed while moving them.
    pub(super) fn write_journal(&self, names: &[OsString]) -> std::io::Result<()> {
        let mut text = Vec::new();
        for name in names {
            text.extend_from_slice(name.as_bytes());
            text.push(0);
        }
        let fd = rustix::fs::openat(
            &self.dir,
            JOURNAL,
            OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::from_raw_mode(0o600),
        )?;
        let mut journal = std::fs::File::from(fd);
        journal.write_all(&text)?;
        journal.sync_all()
    }

    /// The move the journal described has ended: a restore killed from here on left a whole
    /// tree, which is no leftover to remove.
    pub(super) fn close_journal(&self) -> std::io::Result<()> {
        rustix::fs::unlinkat(&self.dir, JOURNAL, AtFlags::empty())?;
        rustix::fs::fsync(&self.dir)?;
        Ok(())
    }

    /// Removes what the staging directory holds under `name`, if anything.
    pub(super) fn remove(&self, name: &str) -> std::io::Result<()> {
        remove_tree_at(self.dir.as_fd(), OsStr::new(name))
    }

    /// Downloads one object as stored into the staging directory, verifying its checksum.
    pub(super) async fn fetch_stored(
        &self,
        repository: &Repository,
        manifest: &Manifest,
        object: &ObjectEntry,
    ) -> Result<PathBuf> {
        self.remove(&object.name).map_err(|e| {
            Error::new(ErrorKind::Target, "unable to clear the staging directory").with_source(e)
        })?;
        let file = self.create_file(&object.name)?;
        let stored = StoredObject {
            repository,
            manifest,
            object,
        };
        stored.download(file).await?;
        Ok(self.path(&object.name))
    }

    /// A path in the staging directory for a file of the restore's own.
    pub(super) fn path(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }

    /// Downloads, decompresses and verifies one object into the staging directory.
    pub(super) async fn fetch(
        &self,
        repository: &Repository,
        manifest: &Manifest,
        object: &ObjectEntry,
        keyring: &Keyring,
    ) -> Result<PathBuf> {
        let name = object.logical_name().trim_end_matches(".zst").to_string();
        self.remove(&name).map_err(|e| {
            Error::new(ErrorKind::Target, "unable to clear the staging directory").with_source(e)
        })?;
        let file = self.create_file(&name)?;
        let stored = StoredObject {
            repository,
            manifest,
            object,
        };
        stored
            .read(keyring, move |raw| {
                let mut out = BufWriter::with_capacity(1024 * 1024, file);
                std::io::copy(raw, &mut out)?;
                out.flush()
            })
            .await?;
        Ok(self.path(&name))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn too_little_room_is_refused_with_the_sizes() {
        let gib = 1024 * 1024 * 1024;
        let err = check_room(Path::new("/var/tmp"), gib, 2 * gib).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Target);
        assert_eq!(
            err.message(),
            "unable to stage the restore in '/var/tmp': it needs 2.1 GiB (2.0 GiB of dumps plus 64.0 MiB to spare) and 1.0 GiB is free"
        );
        assert!(check_room(Path::new("/var/tmp"), 3 * gib, 2 * gib).is_ok());
        assert!(
            check_room(Path::new("/var/tmp"), 2 * gib, 2 * gib).is_err(),
            "the margin counts"
        );
    }
}
