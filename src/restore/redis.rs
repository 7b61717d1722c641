//! Restoring a `redis` backup: the RDB written to a file (temp file + rename) for an
//! operator to put in place, or loaded into a throw-away redis-server on a free loopback
//! port. The RDB is checked twice on the way: both sha256s, and its own CRC-64.

use std::path::{Path, PathBuf};
use std::time::Instant;

use super::files::target_error;
use super::{RestoreReport, Selected};
use crate::error::{Error, ErrorKind, Result};
use crate::layout::RDB_OBJECT;
use crate::sources::redis::{ScratchRedis, copy_rdb_file};
use crate::transfer::StoredObject;

/// Writes the verified RDB of the selected backup into `dest`, which must not exist.
pub(super) async fn write_rdb(selected: &Selected, dest: &Path) -> Result<u64> {
    if dest.symlink_metadata().is_ok() {
        return Err(Error::new(
            ErrorKind::Target,
            format!("unable to restore into '{}': it exists", dest.display()),
        )
        .with_hint("name a new file; lifeboat never overwrites a live RDB"));
    }
    let manifest = &selected.manifest;
    let object = manifest
        .objects
        .iter()
        .find(|o| o.logical_name() == RDB_OBJECT)
        .cloned()
        .ok_or_else(|| {
            Error::new(
                ErrorKind::Verification,
                format!(
                    "unable to restore backup '{}/{}': its manifest has no object '{RDB_OBJECT}'",
                    manifest.job, manifest.id
                ),
            )
        })?;
    let parent = match dest.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent.to_path_buf(),
        _ => PathBuf::from("."),
    };
    selected
        .read_from_any(RDB_OBJECT, async |repository| {
            let mut temp = tempfile::Builder::new()
                .prefix(".lifeboat-restore-")
                .tempfile_in(&parent)
                .map_err(|e| target_error(dest, e))?;
            let file = temp
                .as_file()
                .try_clone()
                .map_err(|e| target_error(dest, e))?;
            let stored = StoredObject {
                repository,
                manifest,
                object: &object,
            };
            let size = stored
                .read(&selected.keyring, move |raw| {
                    let mut out = std::io::BufWriter::new(file);
                    let (size, _) = copy_rdb_file(raw, &mut out)?;
                    out.into_inner().map_err(|e| e.into_error())?.sync_all()?;
                    Ok(size)
                })
                .await?;
            give_like_the_server(temp.as_file(), &parent).map_err(|e| target_error(dest, e))?;
            temp.as_file_mut()
                .sync_all()
                .map_err(|e| target_error(dest, e))?;
            temp.persist_noclobber(dest)
                .map_err(|e| target_error(dest, e.error))?;
            Ok(size)
        })
        .await
}

/// Restoring as root, gives the new RDB file the owner and mode of the `dump.rdb` already in
/// `dir`, else the owner of `dir` and mode 0600: a root-owned file in redis's directory is
/// one the server cannot load. Anyone else keeps the file as their own.
fn give_like_the_server(file: &std::fs::File, dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::MetadataExt;
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Ok(());
    }
    let (owner, mode) = match std::fs::symlink_metadata(dir.join("dump.rdb")) {
        Ok(existing) if existing.is_file() => {
            ((existing.uid(), existing.gid()), existing.mode() & 0o777)
        }
        _ => {
            let dir = std::fs::metadata(dir)?;
            ((dir.uid(), dir.gid()), 0o600)
        }
    };
    rustix::fs::fchown(
        file,
        Some(rustix::fs::Uid::from_raw(owner.0)),
        Some(rustix::fs::Gid::from_raw(owner.1)),
    )?;
    rustix::fs::fchmod(file, rustix::fs::Mode::from_raw_mode(mode))?;
    Ok(())
}

pub(super) async fn restore(
    selected: Selected,
    into: Option<&Path>,
    start_scratch: bool,
) -> Result<RestoreReport> {
    let clock = Instant::now();
    match (into, start_scratch) {
        (Some(dest), false) => {
            let bytes = write_rdb(&selected, dest).await?;
            let stages = vec![("download, verify and write".to_string(), clock.elapsed())];
            Ok(selected.report(
                format!("'{}'", dest.display()),
                vec![format!(
                    "RDB for redis-server (stop it, replace its dbfilename with this file, start it)"
                )],
                bytes,
                Vec::new(),
                stages,
            ))
        }
        (None, true) => {
            let (dir, rdb) = ScratchRedis::prepare()?;
            let bytes = write_rdb(&selected, &rdb).await?;
            let loaded = Instant::now();
            let scratch = ScratchRedis::start(dir).await?;
            let address = scratch.address();
            let scratch_port = scratch.port;
            let stages = vec![
                ("download, verify and write".to_string(), loaded - clock),
                ("load into redis-server".to_string(), loaded.elapsed()),
            ];
            let (pid, dir) = scratch.keep()?;
            Ok(selected.report(
                format!("a scratch redis-server at {address}"),
                vec![format!(
                    "redis-server pid {pid} serving the restored data at {address}; its password is in {} (REDISCLI_AUTH=\"$(cat {})\" redis-cli -p {}); stop it with `kill {pid}` and remove {}",
                    dir.join(crate::sources::redis::SCRATCH_PASSWORD_FILE).display(),
                    dir.join(crate::sources::redis::SCRATCH_PASSWORD_FILE).display(),
                    scratch_port,
                    dir.display()
                )],
                bytes,
                Vec::new(),
                stages,
            ))
        }
        _ => Err(Error::usage(format!(
            "restoring the redis job '{}' needs --into FILE or --start-scratch",
            selected.manifest.job
        ))),
    }
}
