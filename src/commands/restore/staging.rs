//! Local staging for restores: an object is downloaded and verified here before anything
//! reaches the target, either as stored (compressed, to be decoded into the target later) or
//! decompressed, for tools that need a seekable file (pg_restore loading tables in
//! parallel). The space is checked before anything is downloaded.
//!
//! A staging directory is private (0700) and locked (`flock`) while its restore runs. A
//! restore killed before it ended (SIGKILL, a power cut) leaves it behind, unlocked: the next
//! restore that stages in the same place removes it and says so.

use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use crate::commands::human_size;
use crate::error::{Error, ErrorKind, Result};
use crate::keys::Keyring;
use crate::manifest::{Manifest, ObjectEntry};
use crate::repository::Repository;
use crate::transfer::{download_object, read_object};

/// Room kept free beyond the staged bytes, so a restore does not fill the disk to the brim.
const MARGIN: u64 = 64 * 1024 * 1024;

pub(super) struct Staging {
    dir: tempfile::TempDir,
    /// The directory itself, open and locked while the restore runs.
    _lock: std::os::fd::OwnedFd,
}

/// The name of every staging directory starts with this (hidden inside a target, where an
/// `ls` should not show it).
pub(super) const PREFIX: &str = "lifeboat-restore-";
pub(super) const HIDDEN_PREFIX: &str = ".lifeboat-restore-";

/// Removes the staging directories in `dir` whose names start with `prefix` and whose
/// restore is gone (their lock is free), returning what it removed. One it cannot remove
/// is left, with a warning: it never stops the restore that found it.
pub(super) fn remove_leftovers(dir: &Path, prefix: &str) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut removed = Vec::new();
    for entry in entries.flatten() {
        if !entry.file_name().to_string_lossy().starts_with(prefix)
            || !entry.file_type().is_ok_and(|t| t.is_dir())
        {
            continue;
        }
        let path = entry.path();
        let Ok(lock) = rustix::fs::open(
            &path,
            rustix::fs::OFlags::DIRECTORY
                | rustix::fs::OFlags::RDONLY
                | rustix::fs::OFlags::NOFOLLOW
                | rustix::fs::OFlags::CLOEXEC,
            rustix::fs::Mode::empty(),
        ) else {
            continue;
        };
        if rustix::fs::flock(&lock, rustix::fs::FlockOperation::NonBlockingLockExclusive).is_err() {
            continue; // a running restore's
        }
        match std::fs::remove_dir_all(&path) {
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

/// Creates a private staging directory in `base` and locks it. A directory that a cleaner
/// removed between its creation and the lock is made again.
fn create_locked(
    base: &Path,
    prefix: &str,
) -> std::io::Result<(tempfile::TempDir, std::os::fd::OwnedFd)> {
    loop {
        let dir = tempfile::Builder::new().prefix(prefix).tempdir_in(base)?;
        let lock = rustix::fs::open(
            dir.path(),
            rustix::fs::OFlags::DIRECTORY
                | rustix::fs::OFlags::RDONLY
                | rustix::fs::OFlags::NOFOLLOW
                | rustix::fs::OFlags::CLOEXEC,
            rustix::fs::Mode::empty(),
        )?;
        rustix::fs::flock(&lock, rustix::fs::FlockOperation::LockExclusive)?;
        let locked = rustix::fs::fstat(&lock)?;
        match rustix::fs::stat(dir.path()) {
            Ok(now) if (now.st_dev, now.st_ino) == (locked.st_dev, locked.st_ino) => {
                return Ok((dir, lock));
            }
            _ => continue,
        }
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        crate::interrupt::forget(self.dir.path());
    }
}

fn free_bytes(dir: &Path) -> std::io::Result<u64> {
    let path = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes())
        .map_err(std::io::Error::other)?;
    let mut stat: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `path` is a valid C string and `stat` a valid out-pointer.
    if unsafe { libc::statvfs(path.as_ptr(), &mut stat) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(stat.f_bavail as u64 * stat.f_frsize as u64)
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
    /// `needed` bytes.
    pub(super) fn prepare(requested: Option<&Path>, needed: u64) -> Result<Staging> {
        let base = match requested {
            Some(dir) => dir.to_path_buf(),
            None => std::env::var_os("TMPDIR")
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from("/var/tmp")),
        };
        let error = |message: String| Error::new(ErrorKind::Target, message);
        let free = free_bytes(&base).map_err(|e| {
            error(format!(
                "unable to use staging directory '{}'",
                base.display()
            ))
            .with_source(e)
        })?;
        check_room(&base, free, needed)?;
        for removed in remove_leftovers(&base, PREFIX) {
            tracing::warn!(path = %removed.display(), "removed the staging directory of a restore that was stopped before it ended");
        }
        let (dir, lock) = create_locked(&base, PREFIX).map_err(|e| {
            error(format!(
                "unable to create a staging directory in '{}'",
                base.display()
            ))
            .with_source(e)
        })?;
        crate::interrupt::remove_on_interrupt(dir.path());
        Ok(Staging { dir, _lock: lock })
    }

    /// A private directory inside the restore's target `into` (so that nothing crosses a
    /// filesystem and whoever may write the target may stage), with room for `needed` bytes
    /// as well as what is already staged.
    pub(super) fn inside(into: &Path, needed: u64) -> Result<Staging> {
        let error = |message: String| Error::new(ErrorKind::Target, message);
        let free = free_bytes(into).map_err(|e| {
            error(format!("unable to restore into '{}'", into.display())).with_source(e)
        })?;
        check_room_with(into, free, needed, 0).map_err(|e| {
            e.with_hint("free space there, or restore into a directory on a filesystem with room")
        })?;
        let (dir, lock) = create_locked(into, HIDDEN_PREFIX).map_err(|e| {
            error(format!(
                "unable to create a staging directory in '{}'",
                into.display()
            ))
            .with_source(e)
        })?;
        crate::interrupt::remove_on_interrupt(dir.path());
        Ok(Staging { dir, _lock: lock })
    }

    /// The staging directory itself.
    pub(super) fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Downloads one object as stored into the staging directory, verifying its checksum.
    pub(super) async fn fetch_stored(
        &self,
        repository: &Repository,
        manifest: &Manifest,
        object: &ObjectEntry,
    ) -> Result<PathBuf> {
        let path = self.dir.path().join(&object.name);
        download_object(repository, manifest, object, &path).await?;
        Ok(path)
    }

    /// A path in the staging directory for a file of the restore's own.
    pub(super) fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Downloads, decompresses and verifies one object into the staging directory.
    pub(super) async fn fetch(
        &self,
        repository: &Repository,
        manifest: &Manifest,
        object: &ObjectEntry,
        keyring: &Keyring,
    ) -> Result<PathBuf> {
        let path = self
            .dir
            .path()
            .join(object.logical_name().trim_end_matches(".zst"));
        let file = std::fs::File::create(&path).map_err(|e| {
            Error::new(
                ErrorKind::Target,
                format!("unable to create staging file '{}'", path.display()),
            )
            .with_source(e)
        })?;
        read_object(repository, manifest, object, keyring, move |raw| {
            let mut out = BufWriter::with_capacity(1024 * 1024, file);
            std::io::copy(raw, &mut out)?;
            out.flush()
        })
        .await?;
        Ok(path)
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
