//! Unpacks a tar stream beneath a directory handle, so that no entry can reach outside it:
//! every path is made of plain names (no `..`, not absolute), every directory on the way is
//! opened with `O_NOFOLLOW` from the one before it, and every file, link and attribute is
//! created or set through the handle of its parent (`*at` calls, `AT_SYMLINK_NOFOLLOW`) or of
//! the inode itself (`fchown`, `fchmod`, `futimens`). A symlink in the archive is created as
//! a link and never followed, whatever it points at; an entry whose name exists already as
//! another type is refused, never merged; attributes are only ever set on inodes this
//! unpacking created. Directory modes, owners and times are set last, deepest first, as GNU
//! tar does: a read-only directory still receives its files.
//!
//! Component-by-component `openat(O_NOFOLLOW)` rather than `openat2(RESOLVE_BENEATH |
//! RESOLVE_NO_SYMLINKS)`: with paths made of plain names only, the two refuse the same
//! entries, and `openat` works on every kernel and under seccomp filters that refuse
//! `openat2` (it needs Linux 5.6, and container runtimes have blocked it).
//!
//! Symlinks are never followed, so where one points cannot move a write. Absolute targets
//! are kept verbatim, because configuration trees hold them (`/etc/ssl/certs/*.pem`, nginx
//! `sites-enabled`) and they only name live paths. A relative target whose own text climbs
//! out of the tree is refused, as a sign of a hostile archive; that check reads the text
//! alone (`up -> ..` then `x -> up/../..` passes it), and it is not what keeps writes inside.
//! Device nodes and FIFOs are refused: lifeboat never stores them, so an archive holding one
//! was not written by it. A GNU sparse entry keeps its holes (its zeros are not written).
//! Extended attributes and ACLs (PAX records, see [`crate::pax`]) are set through the new
//! inode's descriptor too, on files and directories only; a link entry carrying them is
//! refused, as lifeboat never writes one.

use std::collections::{HashMap, HashSet};
use std::ffi::{OsStr, OsString};
use std::io::{self, Read};
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};

use rustix::fs::{AtFlags, FileType, Mode, OFlags, RenameFlags, Timespec, Timestamps};
use rustix::io::Errno;

use crate::archive::{
    CheckedEntry, EntryKind, Tree, check_entry, ends_inside, for_each_entry, owner_id, plain_names,
    printable, refused,
};
use crate::pax;

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExtractSummary {
    pub entries: u64,
    pub bytes: u64,
    /// Extended attributes and ACLs the target could not take: how many, and the first.
    pub attributes_not_set: u64,
    pub attributes_not_set_first: Vec<String>,
}

impl ExtractSummary {
    /// How many of the first refusals are named.
    const NAMED: usize = 10;

    fn not_set(&mut self, path: &Path, attribute: &str, why: Errno) {
        self.attributes_not_set += 1;
        if self.attributes_not_set_first.len() < Self::NAMED {
            self.attributes_not_set_first.push(format!(
                "{attribute} of '{}' ({})",
                printable(path),
                io::Error::from(why)
            ));
        }
    }

    /// A warning on the attributes not restored, when there were any.
    pub fn attributes_not_restored(&self) -> Option<String> {
        if self.attributes_not_set == 0 {
            return None;
        }
        let rest = self.attributes_not_set - self.attributes_not_set_first.len() as u64;
        let more = if rest > 0 {
            format!(", and {rest} more")
        } else {
            String::new()
        };
        Some(format!(
            "{} extended attribute(s) or ACL(s) not restored, because the target's filesystem does not support them or they need root: {}{more}",
            self.attributes_not_set,
            self.attributes_not_set_first.join(", ")
        ))
    }
}

/// Who owns what an unpacking creates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ownership {
    /// The owners the archive names (root restoring a files backup).
    Archive,
    /// One owner for everything (root restoring a data directory for the server's user).
    Fixed(u32, u32),
    /// Whoever unpacks: only root can give files away.
    Unpacker,
}

impl Ownership {
    /// The archive's owners as root, else the unpacker's.
    pub fn for_this_user() -> Ownership {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } == 0 {
            Ownership::Archive
        } else {
            Ownership::Unpacker
        }
    }

    /// The mode to give an inode the archive says has `mode`. Under one fixed owner (a data
    /// directory), set-id bits have no place: a file set-id to the server's user would let
    /// anyone run as it.
    fn mode(&self, mode: u32) -> u32 {
        match self {
            Ownership::Fixed(..) => mode & 0o1777,
            _ => mode & 0o7777,
        }
    }

    fn of(&self, header: &tar::Header) -> io::Result<Option<(u32, u32)>> {
        Ok(match self {
            Ownership::Archive => Some((
                owner_id(header.uid()?, "uid")?,
                owner_id(header.gid()?, "gid")?,
            )),
            Ownership::Fixed(uid, gid) => Some((*uid, *gid)),
            Ownership::Unpacker => None,
        })
    }
}

fn type_name(mode: u32) -> &'static str {
    match FileType::from_raw_mode(mode) {
        FileType::RegularFile => "file",
        FileType::Directory => "directory",
        FileType::Symlink => "symlink",
        FileType::Fifo => "FIFO",
        FileType::Socket => "socket",
        FileType::CharacterDevice | FileType::BlockDevice => "device node",
        FileType::Unknown => "file of unknown type",
    }
}

/// Sets the extended attributes and ACLs `attributes` on the open inode `fd`, restored from
/// the entry `path`. The kernel's refusal is an error, except where no restore could do better: a
/// filesystem without extended attributes, or (restoring as another user than root)
/// attributes that need root. Those are noted in `summary`, as owners a non-root restore
/// cannot give are not restored either. Under one fixed owner (a data directory), file
/// capabilities are dropped as set-id bits are.
fn set_attributes(
    fd: impl AsFd,
    attributes: &pax::Attributes,
    ownership: Ownership,
    path: &Path,
    summary: &mut ExtractSummary,
) -> io::Result<()> {
    if attributes.is_empty() {
        return Ok(());
    }
    let without_capabilities = matches!(ownership, Ownership::Fixed(..));
    for (attribute, why) in attributes.apply(fd, without_capabilities) {
        let unprivileged = ownership == Ownership::Unpacker;
        match why {
            // No support, or no room: ext4 keeps a file's attributes in one block, so a value
            // another filesystem (XFS) held may not fit. Named, as owners not given are.
            Errno::NOTSUP | Errno::NOSPC | Errno::TOOBIG => summary.not_set(path, &attribute, why),
            Errno::PERM | Errno::ACCESS if unprivileged => summary.not_set(path, &attribute, why),
            why => {
                return Err(io::Error::new(
                    io::Error::from(why).kind(),
                    format!("unable to set {attribute}: {}", io::Error::from(why)),
                ));
            }
        }
    }
    Ok(())
}

/// Gives the open inode `fd` to `owner`, when there is one to give it to.
pub(super) fn give_to(fd: impl AsFd, owner: Option<(u32, u32)>) -> rustix::io::Result<()> {
    match owner {
        Some((uid, gid)) => rustix::fs::fchown(
            fd,
            Some(rustix::fs::Uid::from_raw(uid)),
            Some(rustix::fs::Gid::from_raw(gid)),
        ),
        None => Ok(()),
    }
}

/// An inode, by device and number.
type InodeId = (u64, u64);

fn inode_of(stat: &rustix::fs::Stat) -> InodeId {
    (stat.st_dev, stat.st_ino)
}

/// The times to give an inode whose header says `mtime`: the tar reader hands a base-256
/// field's last eight bytes over as they are, so a time before 1970 (two's complement, as
/// GNU tar and lifeboat write it) reads back as itself.
fn timestamps(mtime: u64) -> Timestamps {
    let at = Timespec {
        tv_sec: mtime as i64,
        tv_nsec: 0,
    };
    Timestamps {
        last_access: at,
        last_modification: at,
    }
}

/// How a directory is opened beneath another: never through a symlink in its place.
pub(super) const DIRECTORY: OFlags = OFlags::DIRECTORY
    .union(OFlags::RDONLY)
    .union(OFlags::NOFOLLOW)
    .union(OFlags::CLOEXEC);

/// A directory that paths are resolved beneath, never through a symlink.
pub struct Beneath {
    root: OwnedFd,
    path: PathBuf,
}

impl Beneath {
    /// Opens `path`, the operator's own choice of directory (resolved as given).
    pub fn open(path: &Path) -> io::Result<Beneath> {
        let root = rustix::fs::open(
            path,
            OFlags::DIRECTORY | OFlags::RDONLY | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        Ok(Beneath {
            root,
            path: path.to_path_buf(),
        })
    }

    /// Opens a restore's target `path`: its parents are resolved as given (the operator's
    /// choice), but not a symlink in its own place.
    pub fn open_target(path: &Path) -> io::Result<Beneath> {
        let root = rustix::fs::open(path, DIRECTORY, Mode::empty())?;
        Ok(Beneath {
            root,
            path: path.to_path_buf(),
        })
    }

    /// Makes the private (0700) directory `name` in the directory `parent` and opens it;
    /// `path` says where that is, for messages.
    pub fn create_at(
        parent: std::os::fd::BorrowedFd<'_>,
        name: &str,
        path: PathBuf,
    ) -> io::Result<Beneath> {
        rustix::fs::mkdirat(parent, name, Mode::from_raw_mode(0o700))?;
        let root = rustix::fs::openat(parent, name, DIRECTORY, Mode::empty())?;
        Ok(Beneath { root, path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.root.as_fd()
    }

    /// Opens the directory `names` (plain names, empty for the root itself) beneath the
    /// root, refusing a symlink or a non-directory on the way. With `created`, missing
    /// directories are made (with the default mode) and recorded there; without, a missing
    /// one is `NotFound`. `entry` names what is being restored, for errors.
    fn directory(
        &self,
        entry: &Path,
        names: &Path,
        mut created: Option<&mut HashSet<InodeId>>,
    ) -> io::Result<OwnedFd> {
        let mut current = rustix::fs::openat(&self.root, ".", DIRECTORY, Mode::empty())?;
        let mut walked = PathBuf::new();
        for name in names.iter() {
            walked.push(name);
            current = match rustix::fs::openat(&current, name, DIRECTORY, Mode::empty()) {
                Ok(fd) => fd,
                Err(Errno::NOENT) if created.is_some() => {
                    rustix::fs::mkdirat(&current, name, Mode::from_raw_mode(0o777))?;
                    let fd = rustix::fs::openat(&current, name, DIRECTORY, Mode::empty())?;
                    if let Some(created) = created.as_deref_mut() {
                        created.insert(inode_of(&rustix::fs::fstat(&fd)?));
                    }
                    fd
                }
                Err(Errno::LOOP) | Err(Errno::NOTDIR) => {
                    let stat = rustix::fs::statat(&current, name, AtFlags::SYMLINK_NOFOLLOW)?;
                    return Err(refused(
                        entry,
                        format!(
                            "'{}' is a {}, not a directory; nothing is written through it",
                            walked.display(),
                            type_name(stat.st_mode)
                        ),
                    ));
                }
                Err(e) => return Err(e.into()),
            };
        }
        Ok(current)
    }

    /// Opens (or, with `OFlags::CREATE`, creates with mode 0600) the file `names` beneath
    /// the root, never through a symlink, the last component included.
    pub fn open_file(&self, names: &Path, flags: OFlags) -> io::Result<OwnedFd> {
        let names = plain_names(names)?;
        let (parent, name) = split(&names)?;
        let parent = self.directory(&names, parent, None)?;
        Ok(rustix::fs::openat(
            &parent,
            name,
            flags | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::from_raw_mode(0o600),
        )?)
    }

    /// Creates the directory `names` (and its missing parents) beneath the root, or opens
    /// it when it exists.
    pub fn create_directory(&self, names: &Path) -> io::Result<OwnedFd> {
        let names = plain_names(names)?;
        let mut ignored = HashSet::new();
        self.directory(&names, &names, Some(&mut ignored))
    }

    /// Moves every entry of the directory `from` (beneath the root) into the root itself;
    /// an entry of the same name already there is an error, never replaced. `journal` is
    /// given the names before the first moves; each name moved is pushed onto `moved`.
    pub fn move_up(
        &self,
        from: &Path,
        journal: impl FnOnce(&[OsString]) -> io::Result<()>,
        moved: &mut Vec<OsString>,
    ) -> io::Result<()> {
        use std::os::unix::ffi::OsStrExt;
        let names = plain_names(from)?;
        let source = self.directory(&names, &names, None)?;
        // Read whole before anything moves: a directory changing under readdir may skip names.
        let mut names = Vec::new();
        for entry in rustix::fs::Dir::read_from(&source)? {
            let entry = entry?;
            let name = entry.file_name();
            if name != c"." && name != c".." {
                names.push(OsStr::from_bytes(name.to_bytes()).to_os_string());
            }
        }
        journal(&names)?;
        for name in names {
            rustix::fs::renameat_with(&source, &name, &self.root, &name, RenameFlags::NOREPLACE)
                .map_err(|e| {
                    io::Error::new(
                        io::Error::from(e).kind(),
                        format!(
                            "unable to move '{}' into '{}': {e}",
                            printable(Path::new(&name)),
                            self.path.display()
                        ),
                    )
                })?;
            moved.push(name);
        }
        Ok(())
    }
}

/// The parent and the last name of a path of plain names.
fn split(names: &Path) -> io::Result<(&Path, &OsStr)> {
    match (names.parent(), names.file_name()) {
        (Some(parent), Some(name)) => Ok((parent, name)),
        _ => Err(refused(names, "it names the restore directory itself")),
    }
}

/// A directory whose attributes are set once everything beneath it is written.
struct PendingDirectory {
    names: PathBuf,
    inode: InodeId,
    mode: u32,
    mtime: u64,
    owner: Option<(u32, u32)>,
    attributes: pax::Attributes,
    ownership: Ownership,
}

/// What an unpacking left to do: the directories' attributes.
pub struct Unpacked {
    pub summary: ExtractSummary,
    directories: Vec<PendingDirectory>,
}

impl Unpacked {
    /// Sets the attributes of every directory but the top ones (those directly in the
    /// directory unpacked into), deepest first, beneath `root`: the top ones can still be
    /// moved elsewhere afterwards, by someone who may write them.
    pub fn finish_nested(&mut self, root: &Beneath) -> io::Result<()> {
        let (nested, top) = std::mem::take(&mut self.directories)
            .into_iter()
            .partition(|d| d.names.components().count() > 1);
        self.directories = top;
        set_directory_attributes(nested, root, &mut self.summary)
    }

    /// Sets the directories' modes, owners and times (those `finish_nested` left), deepest
    /// first, beneath `root` — the directory unpacked into, or the one its entries were moved
    /// into since. A directory that is no longer the inode this unpacking created is an
    /// error.
    pub fn finish(mut self, root: &Beneath) -> io::Result<ExtractSummary> {
        set_directory_attributes(self.directories, root, &mut self.summary)?;
        Ok(self.summary)
    }
}

/// Sets the attributes of `directories` beneath `root`, deepest first: a directory is
/// opened through its parents while they are still writable and searchable.
fn set_directory_attributes(
    mut directories: Vec<PendingDirectory>,
    root: &Beneath,
    summary: &mut ExtractSummary,
) -> io::Result<()> {
    directories.sort_by_key(|d| std::cmp::Reverse(d.names.components().count()));
    {
        for directory in &directories {
            let names = &directory.names;
            let failed = |e: io::Error| {
                io::Error::new(
                    e.kind(),
                    format!(
                        "unable to set the attributes of '{}': {e}",
                        printable(&root.path.join(names))
                    ),
                )
            };
            let fd = root.directory(names, names, None).map_err(failed)?;
            let stat = rustix::fs::fstat(&fd).map_err(|e| failed(e.into()))?;
            if inode_of(&stat) != directory.inode {
                return Err(failed(io::Error::other(
                    "it was replaced while the restore ran",
                )));
            }
            give_to(&fd, directory.owner).map_err(|e| failed(e.into()))?;
            set_attributes(
                &fd,
                &directory.attributes,
                directory.ownership,
                names,
                summary,
            )
            .map_err(failed)?;
            rustix::fs::fchmod(&fd, Mode::from_raw_mode(directory.mode & 0o7777))
                .and_then(|()| rustix::fs::futimens(&fd, &timestamps(directory.mtime)))
                .map_err(|e| failed(e.into()))?;
        }
    }
    Ok(())
}

/// Largest write of a file's data.
const WRITE_SIZE: usize = 1024 * 1024;

/// A sparse file's zeros are left as holes in blocks of this size.
const HOLE_BLOCK: usize = 4096;
static ZEROS: [u8; HOLE_BLOCK] = [0; HOLE_BLOCK];

struct Unpacker<'a> {
    root: &'a Beneath,
    ownership: Ownership,
    /// What the entries so far made, by name: what decides the archive's own refusals.
    tree: Tree,
    /// Every inode this unpacking created: the only ones it sets attributes on or links to.
    created: HashSet<InodeId>,
    directories: Vec<PendingDirectory>,
    directory_index: HashMap<PathBuf, usize>,
    /// The last parent directory opened, reused while entries stay in it.
    parent: Option<(PathBuf, OwnedFd)>,
    buffer: Vec<u8>,
    summary: ExtractSummary,
}

impl Unpacker<'_> {
    /// The parent directory of `names`, made when missing, and the entry's own name.
    fn parent<'n>(&mut self, names: &'n Path) -> io::Result<(&OwnedFd, &'n OsStr)> {
        let (parent, name) = split(names)?;
        let cached = matches!(&self.parent, Some((path, _)) if path == parent);
        if !cached {
            let fd = self
                .root
                .directory(names, parent, Some(&mut self.created))?;
            self.parent = Some((parent.to_path_buf(), fd));
        }
        let (_, fd) = self.parent.as_ref().expect("just set");
        Ok((fd, name))
    }

    /// An error for an entry whose name is taken already.
    fn exists(&self, names: &Path, kind: &str) -> io::Error {
        let existing = self
            .parent
            .as_ref()
            .and_then(|(_, fd)| {
                rustix::fs::statat(fd, names.file_name()?, AtFlags::SYMLINK_NOFOLLOW).ok()
            })
            .map(|stat| type_name(stat.st_mode))
            .unwrap_or("entry");
        refused(
            names,
            format!(
                "it is a {kind} and '{}' exists already as a {existing}; entries of the same name are never merged",
                names.display()
            ),
        )
    }

    fn directory(
        &mut self,
        names: &Path,
        header: &tar::Header,
        attributes: pax::Attributes,
    ) -> io::Result<()> {
        if names.as_os_str().is_empty() {
            // The restore directory itself: it is not this unpacking's to change.
            return Ok(());
        }
        let (parent, name) = self.parent(names)?;
        let inode = match rustix::fs::mkdirat(parent, name, Mode::from_raw_mode(0o700)) {
            Ok(()) => {
                let stat = rustix::fs::statat(parent, name, AtFlags::SYMLINK_NOFOLLOW)?;
                self.created.insert(inode_of(&stat));
                inode_of(&stat)
            }
            Err(Errno::EXIST) => {
                let stat = rustix::fs::statat(parent, name, AtFlags::SYMLINK_NOFOLLOW)?;
                let inode = inode_of(&stat);
                if FileType::from_raw_mode(stat.st_mode) != FileType::Directory
                    || !self.created.contains(&inode)
                {
                    return Err(self.exists(names, "directory"));
                }
                inode
            }
            Err(e) => return Err(e.into()),
        };
        let pending = PendingDirectory {
            names: names.to_path_buf(),
            inode,
            mode: self.ownership.mode(header.mode()?),
            mtime: header.mtime()?,
            owner: self.ownership.of(header)?,
            attributes,
            ownership: self.ownership,
        };
        match self.directory_index.get(names) {
            Some(&at) => self.directories[at] = pending,
            None => {
                self.directory_index
                    .insert(names.to_path_buf(), self.directories.len());
                self.directories.push(pending);
            }
        }
        Ok(())
    }

    /// Writes a regular file's data in pieces of up to 1 MiB (the tar crate's own unpacking
    /// writes 8 KiB at a time, and a base backup is mostly 1 GiB relation segments), then
    /// sets owner, extended attributes and ACLs, mode and mtime on the open file.
    fn file(
        &mut self,
        names: &Path,
        entry: &mut tar::Entry<'_, &mut dyn Read>,
        attributes: &pax::Attributes,
    ) -> io::Result<()> {
        let (parent, name) = self.parent(names)?;
        let file = match rustix::fs::openat(
            parent,
            name,
            OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::from_raw_mode(0o600),
        ) {
            Ok(fd) => std::fs::File::from(fd),
            Err(Errno::EXIST) => return Err(self.exists(names, "file")),
            Err(e) => return Err(e.into()),
        };
        self.created.insert(inode_of(&rustix::fs::fstat(&file)?));
        // A sparse entry keeps its holes: its zeros are not written, so a small archive
        // cannot fill the disk with them, and a sparse file restores sparse.
        let sparse = entry.header().entry_type() == tar::EntryType::GNUSparse;
        self.buffer
            .resize(WRITE_SIZE.min(entry.size() as usize).max(1), 0);
        let mut written = 0;
        loop {
            let n = match entry.read(&mut self.buffer) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            if sparse {
                use std::os::unix::fs::FileExt;
                for (index, block) in self.buffer[..n].chunks(HOLE_BLOCK).enumerate() {
                    // memcmp against zeros: several times faster than a byte loop, and a
                    // sparse file's holes are all read as zeros.
                    if block != &ZEROS[..block.len()] {
                        file.write_all_at(block, written + (index * HOLE_BLOCK) as u64)?;
                    }
                }
            } else {
                io::Write::write_all(&mut &file, &self.buffer[..n])?;
            }
            written += n as u64;
        }
        if sparse {
            file.set_len(written)?;
        }
        if written != entry.size() {
            return Err(ends_inside(names, written, entry.size()));
        }
        let header = entry.header();
        // Owner first (a chown clears capabilities and set-id bits), then attributes while
        // the owner may still write the file (user attributes need it), then the mode (which
        // agrees with an ACL's mask), then times.
        give_to(&file, self.ownership.of(header)?)?;
        set_attributes(&file, attributes, self.ownership, names, &mut self.summary)?;
        rustix::fs::fchmod(
            &file,
            Mode::from_raw_mode(self.ownership.mode(header.mode()?)),
        )?;
        Ok(rustix::fs::futimens(&file, &timestamps(header.mtime()?))?)
    }

    fn symlink(&mut self, names: &Path, target: &Path, header: &tar::Header) -> io::Result<()> {
        let owner = self.ownership.of(header)?;
        let mtime = header.mtime()?;
        let (parent, name) = self.parent(names)?;
        match rustix::fs::symlinkat(target, parent, name) {
            Ok(()) => {}
            Err(Errno::EXIST) => return Err(self.exists(names, "symlink")),
            Err(e) => return Err(e.into()),
        }
        let stat = rustix::fs::statat(parent, name, AtFlags::SYMLINK_NOFOLLOW)?;
        if let Some((uid, gid)) = owner {
            rustix::fs::chownat(
                parent,
                name,
                Some(rustix::fs::Uid::from_raw(uid)),
                Some(rustix::fs::Gid::from_raw(gid)),
                AtFlags::SYMLINK_NOFOLLOW,
            )?;
        }
        rustix::fs::utimensat(parent, name, &timestamps(mtime), AtFlags::SYMLINK_NOFOLLOW)?;
        self.created.insert(inode_of(&stat));
        Ok(())
    }

    /// A hard link to a file this unpacking created earlier in the archive; `target` is
    /// plain names.
    fn hard_link(&mut self, names: &Path, target: &Path) -> io::Result<()> {
        let (source_parent, source_name) = split(target)?;
        let source = match self.root.directory(names, source_parent, None) {
            Ok(fd) => fd,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(refused(
                    names,
                    format!(
                        "hard link to '{}', which the archive does not hold before it",
                        target.display()
                    ),
                ));
            }
            Err(e) => return Err(e),
        };
        let linked = match rustix::fs::statat(&source, source_name, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(stat) => stat,
            Err(Errno::NOENT) => {
                return Err(refused(
                    names,
                    format!(
                        "hard link to '{}', which the archive does not hold before it",
                        target.display()
                    ),
                ));
            }
            Err(e) => return Err(e.into()),
        };
        if FileType::from_raw_mode(linked.st_mode) == FileType::Directory
            || !self.created.contains(&inode_of(&linked))
        {
            return Err(refused(
                names,
                format!(
                    "hard link to '{}', a {} this restore did not create",
                    target.display(),
                    type_name(linked.st_mode)
                ),
            ));
        }
        let (parent, name) = self.parent(names)?;
        match rustix::fs::linkat(&source, source_name, parent, name, AtFlags::empty()) {
            Ok(()) => Ok(()),
            Err(Errno::EXIST) => Err(self.exists(names, "hard link")),
            Err(e) => Err(e.into()),
        }
    }

    fn entry(&mut self, entry: &mut tar::Entry<'_, &mut dyn Read>) -> io::Result<()> {
        // What the archive alone says decides first, as `verify --deep` decides it.
        let CheckedEntry {
            raw,
            names,
            kind,
            attributes,
        } = check_entry(entry)?;
        self.tree.admit(&raw, &names, &kind)?;
        self.ownership
            .of(entry.header())
            .map_err(|e| refused(&raw, e))?;
        // Refusals name the entry already; anything else the system refused names the entry
        // and where it was being written.
        let root = &self.root.path;
        let named = |e: io::Error| {
            if e.kind() == io::ErrorKind::InvalidData || e.kind() == io::ErrorKind::UnexpectedEof {
                return e;
            }
            io::Error::new(
                e.kind(),
                format!(
                    "unable to restore archive entry '{}' as '{}': {e}",
                    printable(&raw),
                    printable(&root.join(&names))
                ),
            )
        };
        let header = entry.header().clone();
        // An interrupt's cleanup removes the staging tree once no entry is being made; once
        // it began, none is: it would race the removal and be left behind.
        let Some(_creating) = crate::interrupt::creating() else {
            return Err(io::Error::new(
                io::ErrorKind::Interrupted,
                "the run is being interrupted",
            ));
        };
        match &kind {
            EntryKind::Directory => self.directory(&names, &header, attributes),
            EntryKind::File { .. } => self.file(&names, entry, &attributes),
            EntryKind::Symlink(target) => self.symlink(&names, target, &header),
            EntryKind::HardLink(target) => self.hard_link(&names, target),
        }
        .map_err(named)
    }
}

/// Unpacks the tar stream `reader` beneath `root`, leaving the directories' attributes to
/// [`Unpacked::finish`]; directories stay writable by their creator until then.
pub fn unpack(reader: &mut dyn Read, root: &Beneath, ownership: Ownership) -> io::Result<Unpacked> {
    let mut unpacker = Unpacker {
        root,
        ownership,
        tree: Tree::new(),
        created: HashSet::new(),
        directories: Vec::new(),
        directory_index: HashMap::new(),
        parent: None,
        buffer: Vec::new(),
        summary: ExtractSummary::default(),
    };
    for_each_entry(reader, |entry| {
        unpacker.entry(entry)?;
        if !entry.header().entry_type().is_dir() {
            unpacker.summary.bytes += entry.size();
        }
        unpacker.summary.entries += 1;
        Ok(())
    })?;
    Ok(Unpacked {
        summary: unpacker.summary,
        directories: unpacker.directories,
    })
}

/// Unpacks the tar stream `reader` into the directory `root`, attributes included, with
/// the owners the archive names when run as root.
pub fn extract(reader: &mut dyn Read, root: &Path) -> io::Result<ExtractSummary> {
    let root = Beneath::open(root)?;
    unpack(reader, &root, Ownership::for_this_user())?.finish(&root)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{MetadataExt, PermissionsExt};

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
    fn names_cannot_write_to_the_terminal() {
        let bytes =
            archive_with(|b| entry(b, tar::EntryType::Fifo, "x\x1b[2K\rrestored OK", None, b""));
        let (_dir, result) = extract_bytes(&bytes);
        let message = result.unwrap_err().to_string();
        assert!(
            !message.contains('\x1b') && !message.contains('\r'),
            "{message:?}"
        );
        assert!(message.contains("x\\u{1b}[2K\\rrestored OK"), "{message:?}");
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

    /// The attack that changed an outside directory's owner, mode and mtime: a symlink to it,
    /// then a directory entry of the same name.
    #[test]
    fn a_directory_entry_over_a_symlink_changes_nothing_through_it() {
        let outside = tempfile::tempdir().unwrap();
        std::fs::set_permissions(outside.path(), std::fs::Permissions::from_mode(0o750)).unwrap();
        let before = std::fs::metadata(outside.path()).unwrap();
        let target = outside.path().to_str().unwrap().to_string();
        let bytes = archive_with(|b| {
            entry(b, tar::EntryType::Symlink, "etc", Some(&target), b"");
            let mut header = tar::Header::new_gnu();
            header.set_entry_type(tar::EntryType::Directory);
            header.set_mode(0o6777);
            header.set_uid(0);
            header.set_gid(0);
            header.set_mtime(1);
            header.set_size(0);
            b.append_data(&mut header, "etc", &[][..]).unwrap();
        });
        let (_dir, result) = extract_bytes(&bytes);
        let message = result.unwrap_err().to_string();
        assert!(
            message.contains("'etc'") && message.contains("exists already as a symlink"),
            "{message}"
        );
        let after = std::fs::metadata(outside.path()).unwrap();
        assert_eq!(after.mode(), before.mode());
        assert_eq!(after.mtime(), before.mtime());
        assert_eq!(after.uid(), before.uid());
    }

    #[test]
    fn entries_of_the_same_name_and_another_type_are_refused_in_either_order() {
        let kinds = [
            (tar::EntryType::Directory, None),
            (tar::EntryType::Regular, None),
            (tar::EntryType::Symlink, Some("elsewhere")),
        ];
        for (first, first_link) in kinds {
            for (second, second_link) in kinds {
                if first == second && first == tar::EntryType::Directory {
                    continue;
                }
                let bytes = archive_with(|b| {
                    entry(b, first, "a", first_link, b"");
                    entry(b, second, "a", second_link, b"");
                });
                let (_dir, result) = extract_bytes(&bytes);
                let message = result.unwrap_err().to_string();
                assert!(
                    message.contains("refusing archive entry 'a'")
                        && message.contains("exists already"),
                    "{first:?} then {second:?}: {message}"
                );
            }
        }
    }

    #[test]
    fn hard_links_only_reach_files_of_the_archive() {
        let outside = tempfile::NamedTempFile::new().unwrap();
        let bytes = archive_with(|b| {
            entry(
                b,
                tar::EntryType::Symlink,
                "out",
                Some(outside.path().to_str().unwrap()),
                b"",
            );
            entry(b, tar::EntryType::Link, "linked", Some("out"), b"");
        });
        let (dir, result) = extract_bytes(&bytes);
        // A link to the symlink itself (never to what it names) is harmless; the outside
        // file keeps its one link.
        if result.is_ok() {
            let meta = std::fs::symlink_metadata(dir.path().join("root/linked")).unwrap();
            assert!(meta.file_type().is_symlink());
        }
        assert_eq!(std::fs::metadata(outside.path()).unwrap().nlink(), 1);

        let bytes = archive_with(|b| {
            entry(b, tar::EntryType::Link, "linked", Some("missing"), b"");
        });
        let (_dir, result) = extract_bytes(&bytes);
        assert!(result.unwrap_err().to_string().contains("does not hold"));

        let bytes = archive_with(|b| {
            entry(b, tar::EntryType::Regular, "data", None, b"shared");
            entry(b, tar::EntryType::Link, "again", Some("data"), b"");
        });
        let (dir, result) = extract_bytes(&bytes);
        result.unwrap();
        let first = std::fs::metadata(dir.path().join("root/data")).unwrap();
        let second = std::fs::metadata(dir.path().join("root/again")).unwrap();
        assert_eq!((first.ino(), first.nlink()), (second.ino(), 2));
    }

    #[test]
    fn devices_and_fifos_are_refused() {
        for kind in [
            tar::EntryType::Char,
            tar::EntryType::Block,
            tar::EntryType::Fifo,
        ] {
            let bytes = archive_with(|b| entry(b, kind, "dev/node", None, b""));
            let (dir, result) = extract_bytes(&bytes);
            let message = result.unwrap_err().to_string();
            assert!(message.contains("'dev/node'"), "{message}");
            assert!(!dir.path().join("root/dev/node").exists());
        }
    }

    #[test]
    fn read_only_directories_receive_their_files_and_keep_their_modes() {
        let bytes = archive_with(|b| {
            let mut header = tar::Header::new_gnu();
            header.set_entry_type(tar::EntryType::Directory);
            header.set_mode(0o500);
            header.set_uid(0);
            header.set_gid(0);
            header.set_mtime(1_000);
            header.set_size(0);
            b.append_data(&mut header, "locked", &[][..]).unwrap();
            let mut header = tar::Header::new_gnu();
            header.set_entry_type(tar::EntryType::Directory);
            header.set_mode(0o000);
            header.set_uid(0);
            header.set_gid(0);
            header.set_mtime(2_000);
            header.set_size(0);
            b.append_data(&mut header, "locked/closed", &[][..])
                .unwrap();
            entry(
                b,
                tar::EntryType::Regular,
                "locked/closed/file",
                None,
                b"data",
            );
        });
        let (dir, result) = extract_bytes(&bytes);
        result.unwrap();
        let root = dir.path().join("root");
        let closed = std::fs::metadata(root.join("locked/closed")).unwrap();
        assert_eq!((closed.mode() & 0o7777, closed.mtime()), (0, 2_000));
        let locked = std::fs::metadata(root.join("locked")).unwrap();
        assert_eq!((locked.mode() & 0o7777, locked.mtime()), (0o500, 1_000));
        std::fs::set_permissions(root.join("locked"), std::fs::Permissions::from_mode(0o700))
            .unwrap();
        std::fs::set_permissions(
            root.join("locked/closed"),
            std::fs::Permissions::from_mode(0o700),
        )
        .unwrap();
        assert_eq!(
            std::fs::read(root.join("locked/closed/file")).unwrap(),
            b"data"
        );
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

#[cfg(test)]
mod owner_and_type_tests {
    use super::*;

    fn one_file(uid: u64) -> Vec<u8> {
        let mut header = tar::Header::new_gnu();
        header.set_entry_type(tar::EntryType::Regular);
        header.set_mode(0o644);
        header.set_uid(uid);
        header.set_gid(0);
        header.set_size(1);
        header.set_path("f").unwrap();
        header.set_cksum();
        let mut builder = tar::Builder::new(Vec::new());
        builder.append(&header, &b"x"[..]).unwrap();
        builder.into_inner().unwrap()
    }

    /// An owner that does not fit a uid would wrap (2^40 to root), and u32::MAX would leave
    /// the owner unchanged: both are refused, naming the entry, when owners are restored.
    #[test]
    fn owners_that_fit_no_uid_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        for uid in [1u64 << 40, u32::MAX as u64] {
            let root = Beneath::open(dir.path()).unwrap();
            let Err(e) = unpack(&mut &one_file(uid)[..], &root, Ownership::Archive) else {
                panic!("uid {uid} was accepted");
            };
            assert!(e.to_string().contains("archive entry 'f'"), "{e}");
            assert!(e.to_string().contains(&format!("uid {uid}")), "{e}");
        }
        assert!(std::fs::read_dir(dir.path()).unwrap().next().is_none());
    }

    #[test]
    fn long_names_are_cut_in_messages() {
        let name = "n".repeat(100_000);
        let shown = printable(Path::new(&name));
        assert!(shown.len() < 600, "{}", shown.len());
        assert!(shown.ends_with("(100000 bytes)"), "{shown}");
    }
}
