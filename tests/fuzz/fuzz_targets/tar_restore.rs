//! The tar restore path: whatever the archive holds (`..`, absolute paths, symlinks out and
//! through, hard links, devices, entries of one name and several types, huge headers),
//! nothing outside the target directory changes. The target sits five levels below a scratch
//! directory; beside it lie a directory and a file an archive may name (`../outside`,
//! `../outside-file`, or their absolute paths, which the seeds hold). After the restore the
//! scratch tree holds nothing new, and every inode of it outside the target has the mode,
//! owner, link count, size, times, contents, extended attributes and ACLs it had.
#![no_main]

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use libfuzzer_sys::fuzz_target;

#[derive(Debug, PartialEq)]
struct State {
    mode: u32,
    owner: (u32, u32),
    nlink: u64,
    size: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
    content: Vec<u8>,
    /// Extended attributes and ACLs, as a backup would store them (never followed).
    attributes: Vec<lifeboat::pax::Record>,
}

/// Every inode under `scratch` but the target's own tree.
fn outside(scratch: &Path, root: &Path) -> BTreeMap<PathBuf, State> {
    let mut states = BTreeMap::new();
    let mut pending = vec![scratch.to_path_buf()];
    while let Some(path) = pending.pop() {
        if path == root {
            continue;
        }
        let meta = std::fs::symlink_metadata(&path).unwrap();
        let mut content = Vec::new();
        if meta.is_dir() {
            let mut names: Vec<_> = std::fs::read_dir(&path)
                .unwrap()
                .map(|e| e.unwrap().file_name())
                .collect();
            names.sort();
            for name in names {
                content.extend_from_slice(name.as_encoded_bytes());
                content.push(b'/');
                pending.push(path.join(name));
            }
        } else if meta.is_file() {
            content = std::fs::read(&path).unwrap();
        } else if meta.file_type().is_symlink() {
            content = std::fs::read_link(&path)
                .unwrap()
                .into_os_string()
                .into_encoded_bytes();
        }
        let attributes = if meta.file_type().is_symlink() {
            Vec::new()
        } else {
            lifeboat::pax::read(lifeboat::pax::Inode::Path(&path)).unwrap()
        };
        states.insert(
            path,
            State {
                mode: meta.mode(),
                owner: (meta.uid(), meta.gid()),
                nlink: meta.nlink(),
                size: if meta.is_dir() { 0 } else { meta.size() },
                mtime: (meta.mtime(), meta.mtime_nsec()),
                ctime: (meta.ctime(), meta.ctime_nsec()),
                content,
                attributes,
            },
        );
    }
    states
}

/// Sets the extended attribute `name` of `path`.
fn set_attribute(path: &Path, name: &str, value: &[u8]) -> std::io::Result<()> {
    let c_path = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
    let c_name = std::ffi::CString::new(name).unwrap();
    // SAFETY: valid C strings, and a value of the length given.
    let status = unsafe {
        libc::setxattr(c_path.as_ptr(), c_name.as_ptr(), value.as_ptr().cast(), value.len(), 0)
    };
    if status == 0 { Ok(()) } else { Err(std::io::Error::last_os_error()) }
}

fuzz_target!(|data: &[u8]| {
    let scratch = tempfile::tempdir().unwrap();
    let fence = scratch.path().join("a/b/c/d/e");
    let root = fence.join("root");
    std::fs::create_dir_all(&root).unwrap();
    std::fs::create_dir(fence.join("outside")).unwrap();
    std::fs::write(fence.join("outside/victim"), b"precious").unwrap();
    std::fs::write(fence.join("outside-file"), b"precious too").unwrap();
    // An attribute for an archive to change or remove, where the filesystem keeps them.
    let _ = set_attribute(&fence.join("outside-file"), "user.origin", b"fence");
    let before = outside(scratch.path(), &root);
    let restored = lifeboat::restore::extract_tar(&mut &data[..], &root);
    // What verify passes, a restore writes: the archive's own rules decide both.
    let checked = lifeboat::archive::check_archive(&mut &data[..]);
    if let (Err(e), Ok(_)) = (&restored, &checked) {
        assert!(
            !matches!(e.kind(), std::io::ErrorKind::InvalidData | std::io::ErrorKind::UnexpectedEof),
            "verify passed an archive the restore refused: {e}"
        );
    }
    let after = outside(scratch.path(), &root);
    for (path, state) in &after {
        assert_eq!(
            before.get(path),
            Some(state),
            "'{}' changed outside the target",
            path.display()
        );
    }
    assert_eq!(before.len(), after.len(), "an inode outside the target went away");
});
