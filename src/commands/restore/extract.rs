//! Unpacks a `files` tar stream into a staging directory, refusing any entry that could land
//! outside it: absolute paths, `..`, hard links out of the tree, relative symlinks that climb
//! out, and anything written through a symlink. Absolute symlink targets are kept verbatim,
//! because configuration trees hold them (`/etc/ssl/certs/*.pem`, nginx `sites-enabled`) and
//! they only name live paths; nothing is ever written through them.

use std::io::{self, Read};
use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path, PathBuf};

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ExtractSummary {
    pub entries: u64,
    pub bytes: u64,
}

fn unsafe_entry(path: &Path, why: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("refusing archive entry '{}': {why}", path.display()),
    )
}

/// The path must be relative and made of plain names only.
fn check_relative(path: &Path) -> io::Result<()> {
    if path.as_os_str().is_empty() {
        return Err(unsafe_entry(path, "empty path"));
    }
    for component in path.components() {
        match component {
            Component::Normal(_) | Component::CurDir => {}
            Component::ParentDir => return Err(unsafe_entry(path, "path contains '..'")),
            Component::RootDir | Component::Prefix(_) => {
                return Err(unsafe_entry(path, "absolute path"));
            }
        }
    }
    Ok(())
}

/// A relative symlink target, resolved from the link's directory, must stay inside the tree.
fn check_symlink(path: &Path, target: &Path) -> io::Result<()> {
    if target.is_absolute() {
        return Ok(());
    }
    let mut depth = path
        .components()
        .filter(|c| matches!(c, Component::Normal(_)))
        .count() as i64
        - 1;
    for component in target.components() {
        match component {
            Component::Normal(_) => depth += 1,
            Component::ParentDir => depth -= 1,
            _ => {}
        }
        if depth < 0 {
            return Err(unsafe_entry(
                path,
                &format!(
                    "symlink to '{}' points outside the restore directory",
                    target.display()
                ),
            ));
        }
    }
    Ok(())
}

/// No existing component between `root` and the entry may be a symlink.
fn check_no_symlink_parents(root: &Path, path: &Path) -> io::Result<()> {
    let mut current = root.to_path_buf();
    let parents: Vec<_> = path
        .parent()
        .map(|p| p.components().collect())
        .unwrap_or_default();
    for component in parents {
        current.push(component);
        match std::fs::symlink_metadata(&current) {
            Ok(meta) if meta.file_type().is_symlink() => {
                return Err(unsafe_entry(
                    path,
                    "a parent directory is a symlink; refusing to write through it",
                ));
            }
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => break,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

struct DirectoryAttributes {
    path: PathBuf,
    mode: u32,
    mtime: u64,
    owner: Option<(u32, u32)>,
}

/// Largest write of a file's data.
const WRITE_SIZE: usize = 1024 * 1024;

/// Writes a regular file's data in pieces of up to 1 MiB: the tar crate's own unpacking
/// writes 8 KiB at a time, and a base backup is mostly 1 GiB relation segments. The file
/// must not exist yet (`create_new` also refuses a symlink in its place); the caller has
/// checked its path and that no parent is a symlink. Attributes are set as tar sets them:
/// owner, then mode (a chown clears set-id bits), and mtime.
fn write_file(
    entry: &mut tar::Entry<'_, &mut dyn Read>,
    target: &Path,
    buffer: &mut Vec<u8>,
    as_root: bool,
) -> io::Result<()> {
    let failed = |e: io::Error| {
        io::Error::new(
            e.kind(),
            format!("unable to write '{}': {e}", target.display()),
        )
    };
    if let Some(parent) = target.parent() {
        std::fs::create_dir_all(parent).map_err(failed)?;
    }
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(target)
        .map_err(failed)?;
    buffer.resize(WRITE_SIZE.min(entry.size() as usize).max(1), 0);
    let mut written = 0;
    loop {
        let n = match entry.read(buffer) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        io::Write::write_all(&mut file, &buffer[..n]).map_err(failed)?;
        written += n as u64;
    }
    if written != entry.size() {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!(
                "the archive ends inside '{}': {written} of its {} bytes",
                target.display(),
                entry.size()
            ),
        ));
    }
    let header = entry.header();
    if as_root {
        std::os::unix::fs::fchown(
            &file,
            Some(header.uid()? as u32),
            Some(header.gid()? as u32),
        )
        .map_err(failed)?;
    }
    file.set_permissions(std::fs::Permissions::from_mode(header.mode()? & 0o7777))
        .map_err(failed)?;
    let mtime = filetime::FileTime::from_unix_time(header.mtime()? as i64, 0);
    filetime::set_file_handle_times(&file, Some(mtime), Some(mtime)).map_err(failed)
}

pub fn extract(reader: &mut dyn Read, root: &Path) -> io::Result<ExtractSummary> {
    // Ownership can only be given away by root; otherwise files belong to whoever restores.
    let as_root = unsafe { libc::geteuid() } == 0;
    let mut archive = tar::Archive::new(reader);
    archive.set_preserve_permissions(true);
    archive.set_preserve_mtime(true);
    archive.set_preserve_ownerships(as_root);
    archive.set_unpack_xattrs(false);
    archive.set_overwrite(false);

    let mut summary = ExtractSummary::default();
    let mut directories = Vec::new();
    let mut buffer = Vec::new();
    for entry in archive.entries()? {
        let mut entry = entry?;
        let path = entry.path()?.into_owned();
        check_relative(&path)?;
        check_no_symlink_parents(root, &path)?;
        let header = entry.header();
        let kind = header.entry_type();
        if kind.is_symlink() || kind.is_hard_link() {
            let target = entry
                .link_name()?
                .ok_or_else(|| unsafe_entry(&path, "link without a target"))?
                .into_owned();
            if kind.is_symlink() {
                check_symlink(&path, &target)?;
            } else {
                check_relative(&target)?;
            }
        }
        if kind.is_dir() {
            // Permissions and mtime are applied after the children are written: a read-only
            // directory must still receive its files, and writing them changes the mtime.
            let target = root.join(&path);
            std::fs::create_dir_all(&target)?;
            directories.push(DirectoryAttributes {
                path: target,
                mode: header.mode()?,
                mtime: header.mtime()?,
                owner: if as_root {
                    Some((header.uid()? as u32, header.gid()? as u32))
                } else {
                    None
                },
            });
        } else {
            summary.bytes += entry.size();
            if kind.is_file() && !entry.path_bytes().ends_with(b"/") {
                write_file(&mut entry, &root.join(&path), &mut buffer, as_root)?;
            } else if !entry.unpack_in(root)? {
                return Err(unsafe_entry(
                    &path,
                    "it would land outside the restore directory",
                ));
            }
        }
        summary.entries += 1;
    }
    for directory in directories.iter().rev() {
        if let Some((uid, gid)) = directory.owner {
            std::os::unix::fs::chown(&directory.path, Some(uid), Some(gid))?;
        }
        std::fs::set_permissions(
            &directory.path,
            std::fs::Permissions::from_mode(directory.mode & 0o7777),
        )?;
        let mtime = filetime::FileTime::from_unix_time(directory.mtime as i64, 0);
        filetime::set_file_mtime(&directory.path, mtime)?;
    }
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn archive_with(build: impl FnOnce(&mut tar::Builder<Vec<u8>>)) -> Vec<u8> {
        let mut builder = tar::Builder::new(Vec::new());
        build(&mut builder);
        builder.into_inner().unwrap()
    }

    fn entry(
        builder: &mut tar::Builder<Vec<u8>>,
        kind: tar::EntryType,
        path: &str,
        link: Option<&str>,
        data: &[u8],
    ) {
        let mut header = tar::Header::new_gnu();
        header.set_entry_type(kind);
        header.set_mode(0o644);
        header.set_uid(0);
        header.set_gid(0);
        header.set_mtime(0);
        header.set_size(data.len() as u64);
        // Write the raw name so that unsafe names reach the extractor as an attacker would send them.
        let name = &mut header.as_old_mut().name;
        name[..path.len()].copy_from_slice(path.as_bytes());
        if let Some(link) = link {
            header.set_link_name(link).unwrap();
        }
        header.set_cksum();
        builder.append(&header, data).unwrap();
    }

    fn extract_bytes(bytes: &[u8]) -> (tempfile::TempDir, io::Result<ExtractSummary>) {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        std::fs::create_dir(&root).unwrap();
        let result = extract(&mut &bytes[..], &root);
        (dir, result)
    }

    #[test]
    fn parent_dir_entries_are_refused() {
        let bytes =
            archive_with(|b| entry(b, tar::EntryType::Regular, "a/../../escape", None, b"x"));
        let (dir, result) = extract_bytes(&bytes);
        assert!(result.unwrap_err().to_string().contains("contains '..'"));
        assert!(!dir.path().join("escape").exists());
    }

    #[test]
    fn absolute_entries_are_refused() {
        let bytes = archive_with(|b| {
            entry(
                b,
                tar::EntryType::Regular,
                "/tmp/lifeboat-escape",
                None,
                b"x",
            )
        });
        let (_dir, result) = extract_bytes(&bytes);
        assert!(result.unwrap_err().to_string().contains("absolute path"));
    }

    #[test]
    fn relative_symlinks_that_climb_out_are_refused() {
        let bytes = archive_with(|b| {
            entry(
                b,
                tar::EntryType::Symlink,
                "etc/link",
                Some("../../outside"),
                b"",
            )
        });
        let (_dir, result) = extract_bytes(&bytes);
        assert!(result.unwrap_err().to_string().contains("points outside"));
        let bytes = archive_with(|b| {
            entry(
                b,
                tar::EntryType::Symlink,
                "etc/nginx/mod",
                Some("../../usr/lib/mod"),
                b"",
            )
        });
        let (_dir, result) = extract_bytes(&bytes);
        assert!(
            result.is_ok(),
            "a link that stays inside the tree is fine: {result:?}"
        );
    }

    #[test]
    fn nothing_is_written_through_a_symlink() {
        let outside = tempfile::tempdir().unwrap();
        let target = outside.path().to_str().unwrap().to_string();
        let bytes = archive_with(|b| {
            entry(b, tar::EntryType::Symlink, "etc/evil", Some(&target), b"");
            entry(
                b,
                tar::EntryType::Regular,
                "etc/evil/passwd",
                None,
                b"owned",
            );
        });
        let (_dir, result) = extract_bytes(&bytes);
        let message = result.unwrap_err().to_string();
        assert!(message.contains("symlink"), "{message}");
        assert!(!outside.path().join("passwd").exists());
    }

    #[test]
    fn files_keep_their_bytes_mode_and_mtime_across_many_writes() {
        let data: Vec<u8> = (0..5 * WRITE_SIZE / 2)
            .map(|i| (i * 7 % 251) as u8)
            .collect();
        let mut bytes = archive_with(|b| {
            let mut header = tar::Header::new_gnu();
            header.set_entry_type(tar::EntryType::Regular);
            header.set_mode(0o640);
            header.set_uid(0);
            header.set_gid(0);
            header.set_mtime(1_000_000);
            header.set_size(data.len() as u64);
            b.append_data(&mut header, "base/16384/2619", &data[..])
                .unwrap();
        });
        let (dir, result) = extract_bytes(&bytes);
        assert_eq!(result.unwrap().bytes, data.len() as u64);
        let restored = dir.path().join("root/base/16384/2619");
        assert!(std::fs::read(&restored).unwrap() == data);
        let meta = std::fs::metadata(&restored).unwrap();
        assert_eq!(meta.permissions().mode() & 0o7777, 0o640);
        use std::os::unix::fs::MetadataExt;
        assert_eq!(meta.mtime(), 1_000_000);

        // Cut inside the file's data: an error naming the file, not a short file.
        bytes.truncate(512 + data.len() / 2);
        let (_dir, result) = extract_bytes(&bytes);
        let message = result.unwrap_err().to_string();
        assert!(
            message.contains("ends inside") && message.contains("2619"),
            "{message}"
        );
    }

    #[test]
    fn hard_links_out_of_the_tree_are_refused() {
        let bytes = archive_with(|b| {
            entry(
                b,
                tar::EntryType::Link,
                "etc/shadow",
                Some("../../etc/shadow"),
                b"",
            )
        });
        let (_dir, result) = extract_bytes(&bytes);
        assert!(result.unwrap_err().to_string().contains("'..'"));
    }
}
