//! The rules every entry of a tar archive meets before a restore writes it, checked from the
//! archive alone: [`check_entry`] reads what one header says (plain names, a type lifeboat
//! writes, attributes that parse, owners that fit) and [`Tree`] what the entries before it
//! made (no name twice but a directory, nothing beneath a file or a symlink, hard links only
//! to what came before). A restore applies both to every entry before it touches the
//! filesystem, and `verify --deep` and a files backup apply the same ones without writing:
//! an archive one of them passes, the others pass too.
//!
//! The tree is kept as 128-bit keyed hashes of the names, not the names, with one kind each:
//! about 50 bytes an entry, so a million-entry archive is checked in some 50 MB.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::io::{self, Read};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

use crate::pax;

/// The deepest entry a restore makes, counted in archive names (the absolute path without
/// its `/`). Configuration trees and data directories are a few levels deep; each level costs
/// a restore a directory walk per entry and a descriptor while removing. A backup passes over
/// deeper entries, naming them, rather than store what no restore would make.
pub const MAX_DEPTH: usize = 128;

/// The largest sparse file stored and restored: ext4's largest file. A restore reads its
/// holes as zeros from the tar reader, so a larger one would keep it busy for days.
pub const MAX_SPARSE_SIZE: u64 = 16 << 40;

/// The longest name shown whole in a message; a longer one (an archive can hold names of
/// any length) is cut, saying how long it was.
const SHOWN_NAME: usize = 512;

/// The longest name of one directory entry Linux takes (`NAME_MAX`).
const NAME_MAX: usize = 255;

/// Linux's `PATH_MAX`, which a symlink's target stays below.
const PATH_MAX: usize = 4096;

/// The top-level names a restore keeps for its staging directories.
pub const STAGING_PREFIX: &str = ".lifeboat-restore-";

/// A name from an archive, as it may be shown: control characters escaped, so that an
/// entry cannot write to the terminal that reads the error, and cut when it is long.
pub fn printable(path: &Path) -> String {
    let text = path.to_string_lossy();
    let mut shown: String = text
        .chars()
        .take(SHOWN_NAME)
        .flat_map(|c| {
            let escaped: Vec<char> = if c.is_control() {
                c.escape_default().collect()
            } else {
                vec![c]
            };
            escaped
        })
        .collect();
    if text.chars().nth(SHOWN_NAME).is_some() {
        shown.push_str(&format!("… ({} bytes)", path.as_os_str().len()));
    }
    shown
}

/// The error for an entry no restore writes: `InvalidData`, naming the entry.
pub fn refused(path: &Path, why: impl std::fmt::Display) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("refusing archive entry '{}': {why}", printable(path)),
    )
}

/// An entry's path as plain names; empty for the directory unpacked into itself.
pub fn plain_names(path: &Path) -> io::Result<PathBuf> {
    if path.as_os_str().is_empty() {
        return Err(refused(path, "empty path"));
    }
    let mut names = PathBuf::new();
    for component in path.components() {
        match component {
            Component::Normal(name) => names.push(name),
            Component::CurDir => {}
            Component::ParentDir => return Err(refused(path, "path contains '..'")),
            Component::RootDir | Component::Prefix(_) => {
                return Err(refused(path, "absolute path"));
            }
        }
    }
    Ok(names)
}

/// Whether a symlink at `path` (plain names) to the relative `target` climbs out of the
/// directory unpacked into, reading the target's text alone.
pub fn climbs_out(path: &Path, target: &Path) -> bool {
    if target.is_absolute() {
        return false;
    }
    let mut depth = path.components().count() as i64 - 1;
    for component in target.components() {
        match component {
            Component::Normal(_) => depth += 1,
            Component::ParentDir => depth -= 1,
            _ => {}
        }
        if depth < 0 {
            return true;
        }
    }
    false
}

/// A symlink's target: not empty, and when relative, staying inside the tree.
fn check_symlink(path: &Path, target: &Path) -> io::Result<()> {
    if target.as_os_str().is_empty() {
        return Err(refused(path, "symlink without a target"));
    }
    if climbs_out(path, target) {
        return Err(refused(
            path,
            format!(
                "symlink to '{}' points outside the restore directory",
                target.display()
            ),
        ));
    }
    Ok(())
}

/// What an entry makes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EntryKind {
    Directory,
    File {
        sparse: bool,
    },
    Symlink(PathBuf),
    /// A hard link to the entry of these plain names, earlier in the archive.
    HardLink(PathBuf),
}

/// One entry's header, checked.
#[derive(Debug)]
pub struct CheckedEntry {
    /// The name as the archive spells it, for messages.
    pub raw: PathBuf,
    /// Plain names beneath the directory unpacked into; empty for that directory itself.
    pub names: PathBuf,
    pub kind: EntryKind,
    pub attributes: pax::Attributes,
}

/// An owner id a file can have: one that fits, and not `u32::MAX`, which means "no change"
/// to `fchown` (an id that does not fit would wrap, 2^40 to root).
pub fn owner_id(id: u64, what: &str) -> io::Result<u32> {
    u32::try_from(id)
        .ok()
        .filter(|id| *id != u32::MAX)
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("its {what} {id} is not one a file can have"),
            )
        })
}

/// Checks what one entry's header says, before anything of it is written.
pub fn check_entry<R: Read>(entry: &mut tar::Entry<'_, R>) -> io::Result<CheckedEntry> {
    let raw = entry.path()?.into_owned();
    // A NUL ends a name for the kernel: what it would make is not what the archive names.
    if entry.path_bytes().contains(&0) {
        return Err(refused(&raw, "its name holds a NUL byte"));
    }
    let names = checked_names(&raw)?;
    let header_type = entry.header().entry_type();
    // Old archivers mark directories as regular files with a trailing slash.
    let is_directory =
        header_type.is_dir() || (header_type.is_file() && entry.path_bytes().ends_with(b"/"));
    if !is_directory && names.as_os_str().is_empty() {
        return Err(refused(&raw, "it names the restore directory itself"));
    }
    let attributes = attributes_of(entry).map_err(|why| refused(&raw, why))?;
    let header = entry.header();
    header
        .uid()
        .and_then(|uid| owner_id(uid, "uid"))
        .and_then(|_| owner_id(header.gid()?, "gid"))
        .map_err(|e| refused(&raw, e))?;
    header.mode().map_err(|e| refused(&raw, e))?;
    header.mtime().map_err(|e| refused(&raw, e))?;
    if attributes.default_acl.is_some() && !is_directory {
        return Err(refused(
            &raw,
            "a default ACL on what is not a directory; Linux sets them on directories only",
        ));
    }
    // Only files carry data: GNU tar reads the bytes after a link or a directory header as
    // the next header, so an archive could show it entries this reader never sees.
    let link = matches!(header_type, tar::EntryType::Symlink | tar::EntryType::Link);
    if (link || is_directory) && entry.size() > 0 {
        return Err(refused(
            &raw,
            format!(
                "a {} entry carrying {} bytes; lifeboat never writes one, and other tar readers take such bytes for entries",
                if is_directory { "directory" } else { "link" },
                entry.size()
            ),
        ));
    }
    let kind = if is_directory {
        EntryKind::Directory
    } else {
        match header_type {
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                EntryKind::File { sparse: false }
            }
            tar::EntryType::GNUSparse => {
                if entry.size() > MAX_SPARSE_SIZE {
                    return Err(refused(
                        &raw,
                        format!("a sparse file of {} bytes", entry.size()),
                    ));
                }
                EntryKind::File { sparse: true }
            }
            tar::EntryType::Symlink | tar::EntryType::Link if !attributes.is_empty() => {
                return Err(refused(
                    &raw,
                    "a link with extended attributes or ACLs; lifeboat never stores them on links",
                ));
            }
            tar::EntryType::Symlink | tar::EntryType::Link => link_kind(entry, &raw, &names)?,
            tar::EntryType::Char | tar::EntryType::Block => {
                return Err(refused(
                    &raw,
                    "a device node; lifeboat never stores them, so this archive was not written by it",
                ));
            }
            tar::EntryType::Fifo => {
                return Err(refused(
                    &raw,
                    "a FIFO; lifeboat never stores them, so this archive was not written by it",
                ));
            }
            other => {
                return Err(refused(
                    &raw,
                    format!(
                        "entry type '{}', which lifeboat never writes",
                        std::ascii::escape_default(other.as_byte())
                    ),
                ));
            }
        }
    };
    Ok(CheckedEntry {
        raw,
        names,
        kind,
        attributes,
    })
}

/// A symlink or hard link entry: its target checked as the link would be made.
fn link_kind<R: Read>(
    entry: &mut tar::Entry<'_, R>,
    raw: &Path,
    names: &Path,
) -> io::Result<EntryKind> {
    let target = entry
        .link_name()?
        .ok_or_else(|| refused(raw, "link without a target"))?
        .into_owned();
    if target.as_os_str().as_bytes().contains(&0) {
        return Err(refused(raw, "its link target holds a NUL byte"));
    }
    if entry.header().entry_type() == tar::EntryType::Symlink {
        check_symlink(names, &target)?;
        if target.as_os_str().len() >= PATH_MAX {
            return Err(refused(
                raw,
                format!(
                    "a symlink target of {} bytes; Linux takes fewer than {PATH_MAX}",
                    target.as_os_str().len()
                ),
            ));
        }
        Ok(EntryKind::Symlink(target))
    } else {
        let linked = plain_names(&target).map_err(|e| {
            refused(
                raw,
                format!(
                    "hard link to '{}': {}",
                    printable(&target),
                    e.to_string().rsplit(": ").next().unwrap_or_default()
                ),
            )
        })?;
        if linked.as_os_str().is_empty() {
            return Err(refused(raw, "hard link to the restore directory itself"));
        }
        Ok(EntryKind::HardLink(linked))
    }
}

/// The entry's name as plain names under the restore directory: each short enough for
/// Linux, not too deep, and not lifeboat's own staging directory.
fn checked_names(raw: &Path) -> io::Result<PathBuf> {
    let names = plain_names(raw)?;
    if let Some(long) = names.iter().find(|name| name.len() > NAME_MAX) {
        return Err(refused(
            raw,
            format!(
                "its name '{}' is {} bytes long; Linux takes at most {NAME_MAX}",
                printable(Path::new(long)),
                long.len()
            ),
        ));
    }
    if names.components().count() > MAX_DEPTH {
        return Err(refused(
            raw,
            format!("it lies deeper than {MAX_DEPTH} directories"),
        ));
    }
    if names.components().next().is_some_and(|top| {
        top.as_os_str()
            .to_string_lossy()
            .starts_with(STAGING_PREFIX)
    }) {
        return Err(refused(
            raw,
            "the name is lifeboat's own, for a restore's staging directory",
        ));
    }
    Ok(names)
}

/// The extended attributes and ACLs an entry's PAX records carry.
fn attributes_of<R: Read>(entry: &mut tar::Entry<'_, R>) -> Result<pax::Attributes, String> {
    let Some(extensions) = entry.pax_extensions().map_err(|e| e.to_string())? else {
        return Ok(pax::Attributes::default());
    };
    let mut records = Vec::new();
    for extension in extensions {
        let extension = extension.map_err(|e| e.to_string())?;
        let key = extension
            .key()
            .map_err(|_| "a PAX record whose keyword is not UTF-8".to_string())?;
        records.push((key.to_string(), extension.value_bytes().to_vec()));
    }
    pax::Attributes::from_records(records.iter().map(|(k, v)| (k.as_str(), v.as_slice())))
}

/// What a name in the tree is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Made {
    Directory,
    File,
    Symlink,
}

impl Made {
    fn name(self) -> &'static str {
        match self {
            Made::Directory => "directory",
            Made::File => "file",
            Made::Symlink => "symlink",
        }
    }
}

/// What the entries so far made, by name: the state a restore's refusals depend on.
pub struct Tree {
    made: HashMap<u128, Made>,
    keys: (RandomState, RandomState),
    /// The last parent found to be a directory all the way down: a directory stays one.
    last_parent: Option<PathBuf>,
}

impl Default for Tree {
    fn default() -> Self {
        Tree::new()
    }
}

impl Tree {
    pub fn new() -> Tree {
        Tree {
            made: HashMap::new(),
            keys: (RandomState::new(), RandomState::new()),
            last_parent: None,
        }
    }

    fn key(&self, names: &Path) -> u128 {
        let bytes = names.as_os_str().as_bytes();
        ((self.keys.0.hash_one(bytes) as u128) << 64) | self.keys.1.hash_one(bytes) as u128
    }

    /// Every directory on the way to `names` (not `names` itself) is one the archive made or
    /// a restore makes; none is a file or a symlink.
    fn walk_to(&mut self, entry: &Path, names: &Path, make: bool) -> io::Result<()> {
        let Some(parent) = names.parent() else {
            return Ok(());
        };
        if self.last_parent.as_deref() == Some(parent) {
            return Ok(());
        }
        let mut walked = PathBuf::new();
        for name in parent.iter() {
            walked.push(name);
            let key = self.key(&walked);
            match self.made.get(&key) {
                Some(Made::Directory) => {}
                Some(other) => {
                    return Err(refused(
                        entry,
                        format!(
                            "'{}' is a {}, not a directory; nothing is written through it",
                            printable(&walked),
                            other.name()
                        ),
                    ));
                }
                None if make => {
                    self.made.insert(key, Made::Directory);
                }
                None => {
                    return Err(io::Error::new(
                        io::ErrorKind::NotFound,
                        "not in the archive",
                    ));
                }
            }
        }
        if make {
            self.last_parent = Some(parent.to_path_buf());
        }
        Ok(())
    }

    /// Admits the entry `raw` (plain `names`, making `kind`) into the tree, or refuses it
    /// as a restore would.
    pub fn admit(&mut self, raw: &Path, names: &Path, kind: &EntryKind) -> io::Result<()> {
        if names.as_os_str().is_empty() {
            // The directory unpacked into: a restore leaves it as it is.
            return Ok(());
        }
        self.walk_to(raw, names, true)?;
        let made = match kind {
            EntryKind::Directory => Made::Directory,
            EntryKind::File { .. } => Made::File,
            EntryKind::Symlink(_) => Made::Symlink,
            EntryKind::HardLink(target) => self.linked(raw, target)?,
        };
        let key = self.key(names);
        match self.made.get(&key) {
            None => {
                self.made.insert(key, made);
                Ok(())
            }
            Some(Made::Directory) if made == Made::Directory => Ok(()),
            Some(existing) => {
                let kind = match kind {
                    EntryKind::HardLink(_) => "hard link",
                    _ => made.name(),
                };
                Err(refused(
                    raw,
                    format!(
                        "it is a {kind} and '{}' exists already as a {}; entries of the same name are never merged",
                        printable(names),
                        existing.name()
                    ),
                ))
            }
        }
    }

    /// What the hard link at `raw` to `target` (plain names) links to: a file or symlink
    /// an entry before it made.
    fn linked(&mut self, raw: &Path, target: &Path) -> io::Result<Made> {
        let absent = || {
            refused(
                raw,
                format!(
                    "hard link to '{}', which the archive does not hold before it",
                    printable(target)
                ),
            )
        };
        match self.walk_to(raw, target, false) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(absent()),
            Err(e) => return Err(e),
        }
        match self.made.get(&self.key(target)) {
            None => Err(absent()),
            Some(Made::Directory) => Err(refused(
                raw,
                format!(
                    "hard link to '{}', a directory this restore did not create",
                    printable(target)
                ),
            )),
            Some(made) => Ok(*made),
        }
    }
}

/// Calls `each` on every entry of the tar stream `reader`, in order; what the tar reader
/// itself refuses (a header's checksum, a sparse map) is reported as the archive's fault,
/// saying after which entry.
pub fn for_each_entry(
    reader: &mut dyn Read,
    mut each: impl FnMut(&mut tar::Entry<'_, &mut dyn Read>) -> io::Result<()>,
) -> io::Result<()> {
    let mut archive = tar::Archive::new(reader);
    let mut last: Option<PathBuf> = None;
    for entry in archive.entries()? {
        let mut entry = entry.map_err(|e| {
            let after = match &last {
                Some(name) => format!("after entry '{}'", printable(name)),
                None => "at its first entry".to_string(),
            };
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("the archive is malformed {after}: {e}"),
            )
        })?;
        last = Some(entry.path().map(|p| p.into_owned()).unwrap_or_default());
        each(&mut entry)?;
    }
    Ok(())
}

/// The error for an entry whose data ends early.
pub fn ends_inside(names: &Path, read: u64, size: u64) -> io::Error {
    io::Error::new(
        io::ErrorKind::UnexpectedEof,
        format!(
            "the archive ends inside '{}': {read} of its {size} bytes",
            printable(names)
        ),
    )
}

/// What a checked archive holds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ArchiveCheck {
    pub entries: u64,
    pub bytes: u64,
}

/// Checks every entry of the tar stream `reader` as a restore would, writing nothing:
/// `InvalidData` naming the first entry a restore refuses, `UnexpectedEof` for one whose
/// data ends early. The stream is read to its end marker, not beyond.
pub fn check_archive(reader: &mut dyn Read) -> io::Result<ArchiveCheck> {
    let mut tree = Tree::new();
    let mut check = ArchiveCheck::default();
    for_each_entry(reader, |entry| {
        let checked = check_entry(entry)?;
        tree.admit(&checked.raw, &checked.names, &checked.kind)?;
        let size = entry.size();
        let read = io::copy(entry, &mut io::sink())?;
        if !matches!(checked.kind, EntryKind::Directory) && read != size {
            return Err(ends_inside(&checked.names, read, size));
        }
        if !matches!(checked.kind, EntryKind::Directory) {
            check.bytes += size;
        }
        check.entries += 1;
        Ok(())
    })?;
    Ok(check)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn archive(entries: &[(&str, tar::EntryType, Option<&str>)]) -> Vec<u8> {
        let mut builder = tar::Builder::new(Vec::new());
        for (name, kind, link) in entries {
            let mut header = tar::Header::new_gnu();
            header.set_entry_type(*kind);
            header.set_mode(0o644);
            header.set_uid(0);
            header.set_gid(0);
            header.set_mtime(0);
            header.set_size(0);
            if let Some(link) = link {
                header.set_link_name(link).unwrap();
            }
            header.set_path(name).unwrap();
            header.set_cksum();
            builder.append(&header, io::empty()).unwrap();
        }
        builder.into_inner().unwrap()
    }

    fn refusal(entries: &[(&str, tar::EntryType, Option<&str>)]) -> Option<String> {
        check_archive(&mut &archive(entries)[..])
            .err()
            .map(|e| e.to_string())
    }

    use tar::EntryType::{Directory, Link, Regular, Symlink};

    #[test]
    fn a_name_twice_is_refused_unless_both_are_directories() {
        assert_eq!(
            refusal(&[("a", Directory, None), ("a", Directory, None)]),
            None
        );
        let twice = refusal(&[("a", Regular, None), ("a", Regular, None)]).unwrap();
        assert!(
            twice.contains("refusing archive entry 'a'") && twice.contains("exists already"),
            "{twice}"
        );
        let link_then_file = refusal(&[("d/a", Symlink, Some("/etc")), ("d/a", Regular, None)]);
        assert!(
            link_then_file
                .unwrap()
                .contains("exists already as a symlink")
        );
        let file_then_dir = refusal(&[("a", Regular, None), ("a", Directory, None)]);
        assert!(file_then_dir.unwrap().contains("exists already as a file"));
    }

    #[test]
    fn nothing_is_made_beneath_a_symlink_or_a_file() {
        let beneath_link = refusal(&[("a", Symlink, Some("/tmp")), ("a/b/c", Regular, None)]);
        assert!(
            beneath_link
                .unwrap()
                .contains("'a/b/c': 'a' is a symlink, not a directory"),
        );
        let beneath_file = refusal(&[("a", Regular, None), ("a/b", Directory, None)]);
        assert!(beneath_file.unwrap().contains("'a' is a file"));
        // Parents an entry implies are directories later entries may name again.
        assert_eq!(
            refusal(&[
                ("a/b/c", Regular, None),
                ("a", Directory, None),
                ("a/b", Directory, None)
            ]),
            None
        );
    }

    #[test]
    fn hard_links_reach_only_files_and_links_made_before_them() {
        assert_eq!(
            refusal(&[("f", Regular, None), ("h", Link, Some("f"))]),
            None
        );
        let before = refusal(&[("h", Link, Some("f")), ("f", Regular, None)]).unwrap();
        assert!(before.contains("does not hold before it"), "{before}");
        let to_dir = refusal(&[("d", Directory, None), ("h", Link, Some("d"))]).unwrap();
        assert!(to_dir.contains("a directory"), "{to_dir}");
        let through = refusal(&[
            ("d/f", Regular, None),
            ("s", Symlink, Some("d")),
            ("h", Link, Some("s/f")),
        ])
        .unwrap();
        assert!(through.contains("'s' is a symlink"), "{through}");
        let over = refusal(&[
            ("f", Regular, None),
            ("h", Link, Some("f")),
            ("h", Regular, None),
        ]);
        assert!(
            over.unwrap()
                .contains("it is a file and 'h' exists already as a file")
        );
    }

    #[test]
    fn relative_links_climbing_out_are_told_apart() {
        assert!(climbs_out(Path::new("etc/x"), Path::new("../../tmp")));
        assert!(!climbs_out(Path::new("etc/x"), Path::new("../tmp")));
        assert!(!climbs_out(Path::new("etc/x"), Path::new("/tmp")));
        assert!(climbs_out(Path::new("x"), Path::new("a/../../b")));
    }
}
