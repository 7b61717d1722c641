//! The `files` job: configured paths as one tar stream, keeping mode, owner, mtime and
//! symlinks. Archive names are the absolute paths without the leading '/', so a restore into
//! DIR puts `/etc/nginx/nginx.conf` at `DIR/etc/nginx/nginx.conf`.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use globset::{Glob, GlobSet, GlobSetBuilder};

use crate::archive::{self, EntryKind, MAX_DEPTH, MAX_SPARSE_SIZE};
use crate::config::FilesJob;
use crate::error::{Error, ErrorKind, Result};
use crate::manifest::{MAX_NOT_STORED, NotStored};
use crate::pax::{self, Inode};

const READ_BUFFER: usize = 1024 * 1024;

/// The most data extents a sparse file is stored with; one with more is stored whole, holes
/// as zeros, because the tar reader's time grows with the square of their number.
const MAX_EXTENTS: usize = 1 << 16;

/// What the archive holds, and what it passed over.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ArchiveSummary {
    pub entries: u64,
    /// Sockets, FIFOs and device nodes (and files that became one while read): how many,
    /// and the first [`MAX_NOT_STORED`] of them.
    pub not_stored: u64,
    pub not_stored_entries: Vec<NotStored>,
    /// Paths listed twice or inside another, each stored once; what was stored while it
    /// changed; paths that stored nothing.
    pub notes: Vec<String>,
    changed: u64,
    changed_first: Vec<String>,
}

impl ArchiveSummary {
    /// How many files changed while read are named.
    const NAMED_CHANGED: usize = 10;

    fn changed_while_read(&mut self, path: &Path) {
        tracing::warn!(path = ?path, "file changed as it was read");
        self.changed += 1;
        if self.changed_first.len() < Self::NAMED_CHANGED {
            self.changed_first
                .push(format!("'{}'", archive::printable(path)));
        }
    }

    /// The notes, with the files that changed while read.
    fn finish(mut self) -> ArchiveSummary {
        if self.changed > 0 {
            let more = self.changed - self.changed_first.len() as u64;
            let more = if more > 0 {
                format!(" and {more} more")
            } else {
                String::new()
            };
            self.notes.push(format!(
                "{} file(s) changed while they were read, so their copies may mix old and new contents: {}{more}",
                self.changed,
                self.changed_first.join(", ")
            ));
        }
        self
    }

    fn pass_over(&mut self, path: &Path, kind: &str) {
        tracing::warn!(path = ?path, kind, "not stored");
        self.not_stored += 1;
        if self.not_stored_entries.len() < MAX_NOT_STORED {
            self.not_stored_entries.push(NotStored {
                path: path.display().to_string(),
                kind: kind.to_string(),
            });
        }
    }
}

/// Whether `error` says the entry is gone: removed between listing and reading it.
fn vanished(error: &io::Error) -> bool {
    error.kind() == io::ErrorKind::NotFound
}

/// Whether `error` says the path is longer than the system resolves (`PATH_MAX`): anyone
/// who may write in the tree can make one, and it must not stop the backup of the rest.
fn too_long(error: &io::Error) -> bool {
    error.raw_os_error() == Some(libc::ENAMETOOLONG)
}

/// What to do when reading `path` failed with `error` before anything of it was written:
/// pass over an entry removed since its directory was listed, or one whose path is too
/// long to read (naming it); anything else fails the backup, as does any failure of a
/// configured path itself (`top`): a backup without it would look whole and be empty.
fn pass_over_or_fail(
    summary: &mut ArchiveSummary,
    path: &Path,
    top: bool,
    error: io::Error,
) -> io::Result<()> {
    if top {
        Err(error)
    } else if vanished(&error) {
        tracing::warn!(path = ?path, "skipping what was removed while the backup ran");
        Ok(())
    } else if too_long(&error) {
        summary.pass_over(path, "path longer than the system reads");
        Ok(())
    } else {
        Err(error)
    }
}

/// What a file that is not stored is.
fn special_kind(file_type: std::fs::FileType) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    if file_type.is_socket() {
        "socket"
    } else if file_type.is_fifo() {
        "fifo"
    } else if file_type.is_block_device() {
        "block device"
    } else if file_type.is_char_device() {
        "character device"
    } else {
        "special file"
    }
}

/// Which paths are stored. A pattern with a '/' matches the whole absolute path; a pattern
/// without one matches the file name, as in .gitignore.
pub struct PathFilter {
    include_names: GlobSet,
    include_paths: GlobSet,
    exclude_names: GlobSet,
    exclude_paths: GlobSet,
    has_include: bool,
}

fn build_sets(patterns: &[String]) -> Result<(GlobSet, GlobSet)> {
    let mut names = GlobSetBuilder::new();
    let mut paths = GlobSetBuilder::new();
    for pattern in patterns {
        let glob = Glob::new(pattern)
            .map_err(|e| Error::config(format!("invalid glob \"{pattern}\": {e}")))?;
        if pattern.contains('/') {
            paths.add(glob);
        } else {
            names.add(glob);
        }
    }
    let build = |b: GlobSetBuilder| {
        b.build()
            .map_err(|e| Error::config(format!("invalid glob set: {e}")))
    };
    Ok((build(names)?, build(paths)?))
}

impl PathFilter {
    pub fn new(include: &[String], exclude: &[String]) -> Result<PathFilter> {
        let (include_names, include_paths) = build_sets(include)?;
        let (exclude_names, exclude_paths) = build_sets(exclude)?;
        Ok(PathFilter {
            include_names,
            include_paths,
            exclude_names,
            exclude_paths,
            has_include: !include.is_empty(),
        })
    }

    fn matches(names: &GlobSet, paths: &GlobSet, path: &Path) -> bool {
        paths.is_match(path) || path.file_name().is_some_and(|name| names.is_match(name))
    }

    pub fn excluded(&self, path: &Path) -> bool {
        Self::matches(&self.exclude_names, &self.exclude_paths, path)
    }

    /// Whether a non-directory is stored; directories are always kept for structure.
    pub fn included(&self, path: &Path) -> bool {
        !self.has_include || Self::matches(&self.include_names, &self.include_paths, path)
    }
}

/// One configured path, as the archive is written from it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Root {
    /// As configured (a trailing '/' kept), for messages.
    pub configured: PathBuf,
    /// Normal names only: where it is read, and (without the '/') its archive name.
    pub path: PathBuf,
    /// A symlink in its place is stored as what it points to, under `path`'s name.
    pub follow: bool,
    /// Written with a trailing '/' (or '/.'): what it names must be a directory, as to tar.
    pub slash: bool,
}

/// The paths an archive is written from, each once, outer ones first; and what was merged.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Roots {
    pub roots: Vec<Root>,
    pub notes: Vec<String>,
    /// One path written both to store a symlink there and to follow it: a conflict where
    /// it is a symlink, the same path twice where it is not.
    pub both_ways: Vec<(PathBuf, PathBuf)>,
    /// What lifeboat writes itself, by what it is, as `FilesJob::lifeboats_own`.
    pub lifeboats_own: Vec<(String, PathBuf)>,
}

/// The job's paths, each once and in the order their archive names sort: a path listed
/// twice is read once, and one inside another is read on its own and left out of the
/// other's walk, so that every entry is stored once.
pub fn roots(job: &FilesJob) -> Roots {
    let mut all: Vec<Root> = job
        .paths
        .iter()
        .map(|configured| Root {
            configured: configured.clone(),
            path: Path::new("/").join(archive_name(configured)),
            follow: job.follows(configured),
            slash: crate::config::FilesJob::ends_with_slash(configured),
        })
        .collect();
    all.sort_by(|a, b| a.path.cmp(&b.path));
    let mut roots = Roots {
        lifeboats_own: job
            .lifeboats_own
            .iter()
            .map(|(what, path)| (what.clone(), Path::new("/").join(archive_name(path))))
            .collect(),
        ..Roots::default()
    };
    for root in all {
        if let Some(same) = roots.roots.iter_mut().find(|r| r.path == root.path) {
            if same.follow != root.follow {
                roots
                    .both_ways
                    .push((same.configured.clone(), root.configured.clone()));
                same.follow = true;
                same.slash |= root.slash;
            }
            roots.notes.push(format!(
                "path '{}' is listed twice (also as '{}'); it is stored once",
                root.configured.display(),
                same.configured.display()
            ));
            continue;
        }
        if let Some(outer) = roots.roots.iter().find(|r| root.path.starts_with(&r.path)) {
            let is_link = std::fs::symlink_metadata(&root.path).is_ok_and(|m| m.is_symlink());
            let note = match (
                root.follow && is_link,
                root.path.parent() == Some(&outer.path),
            ) {
                (true, _) => format!(
                    "path '{}' lies inside '{}': the symlink '{}' is stored as what it points to, not as a link",
                    root.configured.display(),
                    outer.configured.display(),
                    root.path.display()
                ),
                _ => format!(
                    "path '{}' lies inside '{}'; its entries are stored once",
                    root.configured.display(),
                    outer.configured.display()
                ),
            };
            roots.notes.push(note);
        }
        roots.roots.push(root);
    }
    roots
}

/// The error for a configured path no backup stores as it is written.
fn path_error(job_name: &str, root: &Root, why: impl std::fmt::Display) -> Error {
    Error::new(
        ErrorKind::Source,
        format!(
            "path '{}' of job '{job_name}' {why}",
            archive::printable(&root.configured)
        ),
    )
}

/// Fails, before anything is read, on a path a backup would not store as written: one
/// that does not exist, is a socket, FIFO or device, ends with '/' but is no directory, is
/// a symlink whose relative target climbs above '/', lies inside lifeboat's own repository,
/// is written both followed and not where it is a symlink, or lies beneath a symlink that
/// another path stores as a link (no restore writes beneath a link).
pub fn check_roots(job_name: &str, roots: &Roots) -> Result<()> {
    for root in &roots.roots {
        let metadata = std::fs::symlink_metadata(&root.path)
            .map_err(|e| source_error(job_name, "read path", &root.configured, e))?;
        let canonical = |p: &Path| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
        // Where the path is, its own symlink resolved only when it is followed.
        let resolved = match (root.follow, root.path.parent(), root.path.file_name()) {
            (false, Some(parent), Some(name)) => canonical(parent).join(name),
            _ => canonical(&root.path),
        };
        if let Some((what, own)) = roots
            .lifeboats_own
            .iter()
            .find(|(_, own)| root.path.starts_with(own) || resolved.starts_with(canonical(own)))
        {
            return Err(path_error(
                job_name,
                root,
                format!(
                    "lies inside {what} ('{}'), which lifeboat writes itself",
                    own.display()
                ),
            ));
        }
        let stored = if metadata.is_symlink() {
            if let Some((one, other)) = roots
                .both_ways
                .iter()
                .find(|(one, _)| Path::new("/").join(archive_name(one)) == root.path)
            {
                return Err(path_error(
                    job_name,
                    root,
                    format!(
                        "is a symlink, listed both as '{}' (the link) and as '{}' (what it points to); keep one",
                        one.display(),
                        other.display()
                    ),
                ));
            }
            if !root.follow {
                let target = std::fs::read_link(&root.path)
                    .map_err(|e| source_error(job_name, "read the symlink", &root.configured, e))?;
                if archive::climbs_out(&archive_name(&root.path), &target) {
                    return Err(path_error(
                        job_name,
                        root,
                        format!(
                            "is a symlink to '{}', which climbs above '/' and no restore makes; end the path with '/' to store what it points to",
                            target.display()
                        ),
                    ));
                }
                continue;
            }
            std::fs::metadata(&root.path)
                .map_err(|e| source_error(job_name, "follow the symlink", &root.configured, e))?
        } else {
            metadata
        };
        if !stored.is_dir() && !stored.is_file() {
            return Err(path_error(
                job_name,
                root,
                format!(
                    "is a {}; lifeboat stores no sockets, FIFOs or device nodes",
                    special_kind(stored.file_type())
                ),
            ));
        }
        if root.slash && !stored.is_dir() {
            return Err(path_error(
                job_name,
                root,
                "ends with '/' but names a file, not a directory; write it without '/' (and set follow = true to store what a symlink there points to)",
            ));
        }
    }
    for root in &roots.roots {
        for outer in roots.roots.iter().filter(|o| o.path != root.path) {
            if !root.path.starts_with(&outer.path) {
                continue;
            }
            // Every directory from the outer path down to this one's parent is stored as
            // what it is: a symlink among them is stored as a link, unless it is a followed
            // path of its own.
            for ancestor in root.path.ancestors().skip(1) {
                if !ancestor.starts_with(&outer.path) {
                    break;
                }
                let followed = roots.roots.iter().any(|r| r.path == ancestor && r.follow);
                let is_link = std::fs::symlink_metadata(ancestor).is_ok_and(|m| m.is_symlink());
                if is_link && !followed {
                    return Err(Error::new(
                        ErrorKind::Source,
                        format!(
                            "path '{}' of job '{job_name}' lies beneath '{}', a symlink that path '{}' stores as a link; a restore would find the link where this path needs a directory",
                            root.configured.display(),
                            ancestor.display(),
                            outer.configured.display()
                        ),
                    )
                    .with_hint(format!(
                        "list '{}/' to store the directory the link points to, or leave '{}' out",
                        ancestor.display(),
                        root.configured.display()
                    )));
                }
            }
        }
    }
    Ok(())
}

/// What one path is, as `check` shows it: a directory, a file, or a symlink and whether
/// the link or what it points to is stored.
pub fn describe(job_name: &str, root: &Root) -> Result<String> {
    let metadata = std::fs::symlink_metadata(&root.path)
        .map_err(|e| source_error(job_name, "read path", &root.configured, e))?;
    let through = root
        .path
        .ancestors()
        .skip(1)
        .find(|a| std::fs::symlink_metadata(a).is_ok_and(|m| m.is_symlink()))
        .map(|link| format!(", reached through the symlink '{}'", link.display()))
        .unwrap_or_default();
    let shown = root.configured.display();
    if !metadata.is_symlink() {
        let kind = if metadata.is_dir() {
            "a directory"
        } else {
            "a file"
        };
        return Ok(format!("path '{shown}': {kind}{through}"));
    }
    let target = std::fs::read_link(&root.path)
        .map_err(|e| source_error(job_name, "read the symlink", &root.configured, e))?;
    if !root.follow {
        return Ok(format!(
            "path '{shown}': a symlink to '{}', stored as the link only{through} (end the path with '/', or set follow = true, to store what it points to)",
            target.display()
        ));
    }
    let resolved = std::fs::canonicalize(&root.path)
        .map_err(|e| source_error(job_name, "follow the symlink", &root.configured, e))?;
    let kind = if resolved.is_dir() {
        "the directory"
    } else {
        "the file"
    };
    Ok(format!(
        "path '{shown}': a symlink to '{}'; {kind} '{}' is stored under the name '{}'{through}",
        target.display(),
        resolved.display(),
        root.path.display()
    ))
}

fn archive_name(path: &Path) -> PathBuf {
    path.components()
        .filter(|c| matches!(c, std::path::Component::Normal(_)))
        .collect()
}

fn source_error(
    job: &str,
    action: &str,
    path: &Path,
    err: impl Into<Box<dyn std::error::Error + Send + Sync>>,
) -> Error {
    Error::new(
        ErrorKind::Source,
        format!("unable to {action} '{}' for job '{job}'", path.display()),
    )
    .with_source(err)
}

/// Reads exactly `expected` bytes; a file that shrank while being read is an error, because
/// the tar header already promised its size and a short body would corrupt the archive.
struct ExactReader<R> {
    inner: R,
    remaining: u64,
}

impl<R: Read> Read for ExactReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.remaining == 0 {
            return Ok(0);
        }
        let limit = buf
            .len()
            .min(self.remaining.min(usize::MAX as u64) as usize);
        let n = self.inner.read(&mut buf[..limit])?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!(
                    "file shrank while being read ({} bytes missing)",
                    self.remaining
                ),
            ));
        }
        self.remaining -= n as u64;
        Ok(n)
    }
}

/// A directory's metadata and attribute records, read whole before a byte of its entry is
/// written: one removed meanwhile is passed over without leaving half an entry behind. A
/// followed path's own directory is read through its symlink.
fn read_directory(path: &Path, follow: bool) -> io::Result<(std::fs::Metadata, Vec<pax::Record>)> {
    if !follow {
        let metadata = std::fs::symlink_metadata(path)?;
        return Ok((metadata, pax::read(Inode::Path(path))?));
    }
    use std::os::fd::AsFd;
    use std::os::unix::fs::OpenOptionsExt;
    let directory = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY)
        .open(path)?;
    let metadata = directory.metadata()?;
    let records = pax::read(Inode::Open(directory.as_fd()))?;
    Ok((metadata, records))
}

/// Writes the tar stream of `job`'s paths into `out`. Every entry is admitted into the
/// same [`archive::Tree`] a restore checks entries with before it is written: what the
/// restore would refuse fails the backup instead, naming it.
pub fn write_archive(
    job_name: &str,
    job: &FilesJob,
    out: &mut dyn Write,
) -> Result<ArchiveSummary> {
    let filter = PathFilter::new(&job.include, &job.exclude)?;
    let roots = roots(job);
    check_roots(job_name, &roots)?;
    let mut builder = tar::Builder::new(out);
    builder.follow_symlinks(false);
    builder.mode(tar::HeaderMode::Complete);
    let mut writer = ArchiveWriter {
        job_name,
        builder,
        summary: ArchiveSummary {
            notes: roots.notes.clone(),
            ..ArchiveSummary::default()
        },
        tree: archive::Tree::new(),
        linked: Default::default(),
        // lifeboat's own directories by inode: however a path spells its way to one.
        own_inodes: roots
            .lifeboats_own
            .iter()
            .filter_map(|(what, path)| {
                use std::os::unix::fs::MetadataExt;
                let metadata = std::fs::metadata(path).ok()?;
                Some(((metadata.dev(), metadata.ino()), what.clone()))
            })
            .collect(),
    };
    for root in &roots.roots {
        writer.walk(root, &roots, &filter)?;
    }
    let ArchiveWriter {
        builder, summary, ..
    } = writer;
    builder
        .into_inner()
        .and_then(|out| out.flush())
        .map_err(|e| {
            Error::new(
                ErrorKind::Source,
                format!("unable to finish the archive for job '{job_name}'"),
            )
            .with_source(e)
        })?;
    Ok(summary.finish())
}

/// What the walk does after an entry.
enum Next {
    /// The entry is in the archive.
    Stored,
    /// Passed over (said so where it matters); the walk goes on.
    Passed,
    /// A directory passed over with all beneath it.
    SkipDir,
}

/// The archive being written, and what it has seen so far.
struct ArchiveWriter<'a, 'w> {
    job_name: &'a str,
    builder: tar::Builder<&'w mut dyn Write>,
    summary: ArchiveSummary,
    tree: archive::Tree,
    /// The archive name each multiply-linked file was first stored under: later names of
    /// the same inode are stored as hard links to it, so the data is stored, and restored,
    /// once.
    linked: std::collections::HashMap<(u64, u64), PathBuf>,
    own_inodes: std::collections::HashMap<(u64, u64), String>,
}

impl ArchiveWriter<'_, '_> {
    fn admit(&mut self, name: &Path, kind: &EntryKind, path: &Path) -> Result<()> {
        self.tree.admit(name, name, kind).map_err(|e| {
            Error::new(
                ErrorKind::Source,
                format!(
                    "unable to store '{}' for job '{}': a restore would refuse it",
                    path.display(),
                    self.job_name
                ),
            )
            .with_source(e)
        })
    }

    /// The root changed from what `check_roots` found: the run must not go on without it.
    fn replaced(&self, root: &Root, what: &str) -> Error {
        Error::new(
            ErrorKind::Source,
            format!(
                "path '{}' of job '{}' was {what} while the backup ran; nothing of it was stored",
                archive::printable(&root.configured),
                self.job_name
            ),
        )
    }

    /// Walks one configured path into the archive.
    fn walk(&mut self, root: &Root, roots: &Roots, filter: &PathFilter) -> Result<()> {
        let job_name = self.job_name;
        // What the path is, and what it leads to, before and after the walk: a path moved,
        // replaced or re-pointed meanwhile (a deploy switching `current`) would give a tree
        // made of two.
        let identity = || {
            use std::os::unix::fs::MetadataExt;
            let link = std::fs::symlink_metadata(&root.path).ok()?;
            let target = std::fs::metadata(&root.path).ok()?;
            Some((link.dev(), link.ino(), target.dev(), target.ino()))
        };
        let before = identity();
        let mut walker = walkdir::WalkDir::new(&root.path)
            .follow_links(false)
            .follow_root_links(root.follow)
            .sort_by_file_name()
            .into_iter();
        while let Some(entry) = walker.next() {
            let entry = match entry {
                Ok(entry) => entry,
                Err(e) => {
                    let path = e
                        .path()
                        .map(Path::to_path_buf)
                        .unwrap_or_else(|| root.path.clone());
                    // Removed since its directory was read (a temporary file, a rotated
                    // log), or too long a path: not the configured path itself.
                    let passed = e.depth() > 0
                        && e.io_error().is_some_and(|io| vanished(io) || too_long(io));
                    if passed {
                        let io = e.into_io_error().expect("an I/O error");
                        pass_over_or_fail(&mut self.summary, &path, false, io)
                            .map_err(|e| source_error(job_name, "read directory", &path, e))?;
                        continue;
                    }
                    return Err(source_error(job_name, "read directory", &path, e));
                }
            };
            let next = self.entry(&entry, root, roots, filter)?;
            match next {
                Next::Stored => self.summary.entries += 1,
                Next::Passed => {}
                Next::SkipDir => walker.skip_current_dir(),
            }
        }
        let after = identity();
        if after.is_none() || after != before {
            return Err(Error::new(
                ErrorKind::Source,
                format!(
                    "path '{}' of job '{job_name}' was moved, removed or replaced while the backup ran, so what was read of it may mix two trees; nothing was committed",
                    archive::printable(&root.configured)
                ),
            )
            .with_hint("run the backup again once it holds still (a deploy switching a symlink, a rename)"));
        }
        Ok(())
    }

    /// One entry of the walk: left out (another root, excluded, lifeboat's own, too deep),
    /// or stored as what it is.
    fn entry(
        &mut self,
        entry: &walkdir::DirEntry,
        root: &Root,
        roots: &Roots,
        filter: &PathFilter,
    ) -> Result<Next> {
        let path = entry.path();
        let top = entry.depth() == 0;
        // walkdir walks a followed path's target but names the path itself a symlink.
        let followed = top && root.follow && entry.path_is_symlink();
        let file_type = match followed {
            true => std::fs::metadata(path)
                .map_err(|e| {
                    source_error(self.job_name, "follow the symlink", &root.configured, e)
                })?
                .file_type(),
            false => entry.file_type(),
        };
        let skip = match file_type.is_dir() {
            true => Next::SkipDir,
            false => Next::Passed,
        };
        // Another configured path, read on its own: stored once, as that path says.
        let another_root = !top && roots.roots.iter().any(|r| r.path == path);
        if another_root || (!top && filter.excluded(path)) {
            return Ok(skip);
        }
        if let Some((what, _)) = roots.lifeboats_own.iter().find(|(_, own)| own == path) {
            self.summary.notes.push(format!(
                "'{}' is {what}, which lifeboat writes itself: not stored",
                archive::printable(path)
            ));
            return Ok(skip);
        }
        let name = archive_name(path);
        if name.as_os_str().is_empty() {
            // '/' itself: the directory a restore unpacks into, which it leaves as it is.
            return Ok(Next::Passed);
        }
        if name.components().count() > MAX_DEPTH {
            self.summary
                .pass_over(path, &format!("deeper than {MAX_DEPTH} directories"));
            return Ok(skip);
        }
        if file_type.is_dir() {
            self.directory(path, &name, root, (top, followed))
        } else if file_type.is_symlink() {
            if !top && !filter.included(path) {
                return Ok(Next::Passed);
            }
            self.symlink(path, &name, root, top)
        } else if file_type.is_file() {
            if !top && !filter.included(path) {
                return Ok(Next::Passed);
            }
            self.file(path, &name, top, followed)
        } else {
            if filter.included(path) {
                self.summary.pass_over(path, special_kind(file_type));
            }
            Ok(Next::Passed)
        }
    }

    fn directory(
        &mut self,
        path: &Path,
        name: &Path,
        root: &Root,
        (top, followed): (bool, bool),
    ) -> Result<Next> {
        let job_name = self.job_name;
        let (metadata, records) = match read_directory(path, followed) {
            Ok(read) => read,
            Err(e) => {
                pass_over_or_fail(&mut self.summary, path, top, e)
                    .map_err(|e| source_error(job_name, "archive directory", path, e))?;
                return Ok(Next::SkipDir);
            }
        };
        if !metadata.is_dir() {
            if top {
                return Err(self.replaced(root, "replaced"));
            }
            tracing::warn!(path = ?path, "skipping a directory replaced while the backup ran");
            return Ok(Next::SkipDir);
        }
        {
            use std::os::unix::fs::MetadataExt;
            if let Some(what) = self.own_inodes.get(&(metadata.dev(), metadata.ino())) {
                self.summary.notes.push(format!(
                    "'{}' is {what}, which lifeboat writes itself: not stored",
                    archive::printable(path)
                ));
                return Ok(Next::SkipDir);
            }
        }
        self.admit(name, &EntryKind::Directory, path)?;
        let mut header = header_of(&metadata);
        header.set_size(0);
        append_records(&mut self.builder, name, &records)
            .and_then(|()| self.builder.append_data(&mut header, name, io::empty()))
            .map_err(|e| source_error(job_name, "archive directory", path, e))?;
        Ok(Next::Stored)
    }

    fn symlink(&mut self, path: &Path, name: &Path, root: &Root, top: bool) -> Result<Next> {
        let job_name = self.job_name;
        // Read once, and stored as read: the target checked is the target written.
        let read = std::fs::symlink_metadata(path)
            .and_then(|metadata| Ok((std::fs::read_link(path)?, metadata)));
        let (target, metadata) = match read {
            Ok(read) => read,
            // No longer a symlink between its lstat and readlink.
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) && !top => {
                tracing::warn!(path = ?path, "skipping a symlink replaced while the backup ran");
                return Ok(Next::Passed);
            }
            Err(e) => {
                pass_over_or_fail(&mut self.summary, path, top, e)
                    .map_err(|e| source_error(job_name, "archive symlink", path, e))?;
                return Ok(Next::Passed);
            }
        };
        if !metadata.is_symlink() {
            if top {
                return Err(self.replaced(root, "replaced"));
            }
            tracing::warn!(path = ?path, "skipping a symlink replaced while the backup ran");
            return Ok(Next::Passed);
        }
        if archive::climbs_out(name, &target) {
            self.summary
                .pass_over(path, "symlink whose relative target climbs above '/'");
            return Ok(Next::Passed);
        }
        self.admit(name, &EntryKind::Symlink(target.clone()), path)?;
        let mut header = header_of(&metadata);
        header.set_entry_type(tar::EntryType::Symlink);
        header.set_size(0);
        append_symlink(
            &mut self.builder,
            &mut header,
            name,
            target.as_os_str().as_bytes(),
        )
        .map_err(|e| source_error(job_name, "archive symlink", path, e))?;
        Ok(Next::Stored)
    }

    fn file(&mut self, path: &Path, name: &Path, top: bool, followed: bool) -> Result<Next> {
        use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
        let job_name = self.job_name;
        // The open file decides: a name replaced since the directory was read (an editor's
        // rename) is stored as what it is now. Without blocking: a FIFO put in the name's
        // place would wait for a writer. A followed path's own file is opened through its
        // symlink.
        let no_follow = if followed { 0 } else { libc::O_NOFOLLOW };
        let file = match std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK | no_follow)
            .open(path)
        {
            Ok(file) => file,
            Err(e) if e.raw_os_error() == Some(libc::ELOOP) && !top => {
                tracing::warn!(path = ?path, "skipping a file replaced by a symlink while the backup ran");
                return Ok(Next::Passed);
            }
            Err(e) => {
                pass_over_or_fail(&mut self.summary, path, top, e)
                    .map_err(|e| source_error(job_name, "read file", path, e))?;
                return Ok(Next::Passed);
            }
        };
        let metadata = file
            .metadata()
            .map_err(|e| source_error(job_name, "read file", path, e))?;
        if !metadata.is_file() {
            self.summary
                .pass_over(path, special_kind(metadata.file_type()));
            return Ok(Next::Passed);
        }
        if metadata.len() > MAX_SPARSE_SIZE {
            self.summary.pass_over(path, "file larger than 16 TiB");
            return Ok(Next::Passed);
        }
        let inode = (metadata.dev(), metadata.ino());
        if let Some(first) = self.linked.get(&inode).filter(|_| metadata.nlink() > 1) {
            let first = first.clone();
            self.admit(name, &EntryKind::HardLink(first.clone()), path)?;
            let mut header = header_of(&metadata);
            header.set_entry_type(tar::EntryType::Link);
            header.set_size(0);
            self.builder
                .append_link(&mut header, name, &first)
                .map_err(|e| source_error(job_name, "archive hard link", path, e))?;
            return Ok(Next::Stored);
        }
        self.admit(name, &EntryKind::File { sparse: false }, path)?;
        append_file(&mut self.builder, &file, &metadata, name)
            .map_err(|e| source_error(job_name, "read file", path, e))?;
        // Written to while read (same size, or it would have failed): the copy may mix old
        // and new bytes, as GNU tar warns.
        let stamps = |m: &std::fs::Metadata| (m.mtime(), m.mtime_nsec(), m.ctime(), m.ctime_nsec());
        if file
            .metadata()
            .is_ok_and(|now| stamps(&now) != stamps(&metadata))
        {
            self.summary.changed_while_read(path);
        }
        if metadata.nlink() > 1 {
            self.linked.insert(inode, name.to_path_buf());
        }
        Ok(Next::Stored)
    }
}

/// Stores a symlink to `target` exactly as the link holds it: the tar crate's own
/// `append_link` tidies targets (`file/.` to `file`, `a//b` to `a/b`), which changes where
/// some of them lead. A target too long for the header goes first in a GNU long-link entry,
/// as GNU tar writes it.
fn append_symlink(
    builder: &mut tar::Builder<&mut dyn Write>,
    header: &mut tar::Header,
    name: &Path,
    target: &[u8],
) -> io::Result<()> {
    let field = header.as_old().linkname.len();
    if target.len() < field {
        header.set_link_name_literal(target)?;
    } else {
        let mut long = tar::Header::new_gnu();
        long.as_gnu_mut().expect("a GNU header").name[..13].copy_from_slice(b"././@LongLink");
        long.set_mode(0o644);
        long.set_uid(0);
        long.set_gid(0);
        long.set_mtime(0);
        long.set_size(target.len() as u64 + 1);
        long.set_entry_type(tar::EntryType::GNULongLink);
        long.set_cksum();
        builder.append(&long, target.chain(&[0u8][..]))?;
        header.set_link_name_literal(&target[..field - 1])?;
    }
    builder.append_data(header, name, io::empty())
}

/// A GNU header describing `metadata`: mode, owner, size, and the mtime, which before 1970
/// is written as GNU tar writes it (base-256, two's complement), not as the tar crate
/// would (a number past the year 292 billion, which GNU tar refuses).
fn header_of(metadata: &std::fs::Metadata) -> tar::Header {
    use std::os::unix::fs::MetadataExt;
    let mut header = tar::Header::new_gnu();
    header.set_metadata_in_mode(metadata, tar::HeaderMode::Complete);
    if metadata.mtime() < 0 {
        let field = &mut header.as_gnu_mut().expect("a GNU header").mtime;
        let bytes = i128::from(metadata.mtime()).to_be_bytes();
        let width = field.len();
        field.copy_from_slice(&bytes[bytes.len() - width..]);
    }
    header
}

/// Writes a PAX extended header holding `records` for the entry `name` that follows it;
/// nothing when there are none.
fn append_records(
    builder: &mut tar::Builder<&mut dyn Write>,
    name: &Path,
    records: &[pax::Record],
) -> io::Result<()> {
    if records.is_empty() {
        return Ok(());
    }
    let data = pax::encode_records(records);
    let mut header = tar::Header::new_ustar();
    header.set_entry_type(tar::EntryType::XHeader);
    // The name GNU tar gives it; readers ignore it, so a long one is cut.
    let mut pax_name = b"PaxHeaders/".to_vec();
    pax_name.extend_from_slice(name.file_name().unwrap_or_default().as_bytes());
    pax_name.truncate(99);
    header.as_old_mut().name[..pax_name.len()].copy_from_slice(&pax_name);
    header.set_mode(0o644);
    header.set_size(data.len() as u64);
    header.set_cksum();
    builder.append(&header, &data[..])
}

/// Stores the open `file`, its header from the open file's `metadata`, so that name, size
/// and content describe one file; its extended attributes and ACLs in a PAX header before
/// it, and a file with holes as a GNU sparse entry, its holes left out.
fn append_file(
    builder: &mut tar::Builder<&mut dyn Write>,
    file: &File,
    metadata: &std::fs::Metadata,
    name: &Path,
) -> io::Result<()> {
    use std::os::fd::AsFd;
    append_records(builder, name, &pax::read(Inode::Open(file.as_fd()))?)?;
    let mut header = header_of(metadata);
    // Large reads: tar copies in 8 KiB steps, which would otherwise be one syscall each. A
    // buffer no larger than the file: a 1 MiB one for each of thousands of small config files
    // cost an mmap and munmap apiece.
    let buffer = (metadata.len() as usize)
        .saturating_add(1)
        .clamp(8 * 1024, READ_BUFFER);
    let Some(extents) = data_extents(file, metadata)? else {
        let reader = ExactReader {
            inner: io::BufReader::with_capacity(buffer, file),
            remaining: metadata.len(),
        };
        return builder.append_data(&mut header, name, reader);
    };
    // The old GNU sparse format, which GNU tar, bsdtar and the tar crate all read: four
    // extents in the header, 21 in each extension block after it, then their data.
    let stored: u64 = extents.iter().map(|e| e.length).sum();
    header.set_entry_type(tar::EntryType::GNUSparse);
    header.set_size(stored);
    let gnu = header.as_gnu_mut().expect("a GNU header");
    gnu.set_real_size(metadata.len());
    let (first, rest) = extents.split_at(extents.len().min(gnu.sparse.len()));
    for (slot, extent) in gnu.sparse.iter_mut().zip(first) {
        slot.set_offset(extent.offset);
        slot.set_length(extent.length);
    }
    gnu.set_is_extended(!rest.is_empty());
    let mut map = Vec::new();
    let mut blocks = rest.chunks(21).peekable();
    while let Some(block) = blocks.next() {
        let mut extension = tar::GnuExtSparseHeader::new();
        for (slot, extent) in extension.sparse_mut().iter_mut().zip(block) {
            slot.set_offset(extent.offset);
            slot.set_length(extent.length);
        }
        extension.set_is_extended(blocks.peek().is_some());
        map.extend_from_slice(extension.as_bytes());
    }
    let data = ExtentReader {
        file,
        extents: extents.into_iter(),
        current: None,
    };
    let reader = io::Cursor::new(map).chain(io::BufReader::with_capacity(buffer, data));
    builder.append_data(&mut header, name, reader)
}

/// A stretch of a file that holds data; the rest are holes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Extent {
    offset: u64,
    length: u64,
}

/// The data extents of a file with holes, in order, ending with an empty one at its end (as
/// GNU tar writes them), found with `SEEK_DATA` and `SEEK_HOLE`. None for a file without
/// holes, one whose filesystem cannot say, or one that changed while being mapped: it is
/// stored whole.
fn data_extents(file: &File, metadata: &std::fs::Metadata) -> io::Result<Option<Vec<Extent>>> {
    use rustix::fs::SeekFrom;
    use rustix::io::Errno;
    use std::os::unix::fs::MetadataExt;
    let size = metadata.len();
    // Holes or not, a file using as many blocks as its size needs has none worth keeping.
    if size == 0 || metadata.blocks().saturating_mul(512) >= size {
        return Ok(None);
    }
    let mut extents = Vec::new();
    let mut at = 0;
    while at < size {
        let start = match rustix::fs::seek(file, SeekFrom::Data(at)) {
            Ok(start) => start.min(size),
            Err(Errno::NXIO) => break,
            Err(Errno::INVAL | Errno::NOTSUP) => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        if start >= size {
            break;
        }
        let end = match rustix::fs::seek(file, SeekFrom::Hole(start)) {
            Ok(end) => end.min(size),
            Err(Errno::NXIO) => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        if end <= start || extents.len() == MAX_EXTENTS {
            return Ok(None);
        }
        extents.push(Extent {
            offset: start,
            length: end - start,
        });
        at = end;
    }
    // Every extent's data but the last's must fill whole 512-byte archive blocks.
    let unaligned = extents.iter().rev().skip(1).any(|e| e.length % 512 != 0);
    let whole = extents.len() == 1 && extents[0].length == size;
    if unaligned || whole {
        return Ok(None);
    }
    extents.push(Extent {
        offset: size,
        length: 0,
    });
    Ok(Some(extents))
}

/// Reads the data of `extents` one after the other; a file that shrank under one is an
/// error, as for a whole file.
struct ExtentReader<'a> {
    file: &'a File,
    extents: std::vec::IntoIter<Extent>,
    current: Option<Extent>,
}

impl Read for ExtentReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        use std::os::unix::fs::FileExt;
        loop {
            let extent = match self.current {
                Some(extent) if extent.length > 0 => extent,
                _ => match self.extents.next() {
                    Some(next) => {
                        self.current = Some(next);
                        continue;
                    }
                    None => return Ok(0),
                },
            };
            let limit = buf.len().min(extent.length.min(usize::MAX as u64) as usize);
            let n = self.file.read_at(&mut buf[..limit], extent.offset)?;
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!(
                        "file shrank while being read (it ends before offset {})",
                        extent.offset + extent.length
                    ),
                ));
            }
            self.current = Some(Extent {
                offset: extent.offset + n as u64,
                length: extent.length - n as u64,
            });
            return Ok(n);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_without_slash_match_names_and_with_slash_whole_paths() {
        let filter = PathFilter::new(&[], &["*.swp".into(), "/etc/app/secret/*".into()]).unwrap();
        assert!(filter.excluded(Path::new("/etc/app/.main.conf.swp")));
        assert!(filter.excluded(Path::new("/etc/app/secret/key")));
        assert!(!filter.excluded(Path::new("/etc/app/main.conf")));
        let filter = PathFilter::new(&["*.conf".into()], &[]).unwrap();
        assert!(filter.included(Path::new("/etc/app/main.conf")));
        assert!(!filter.included(Path::new("/etc/app/notes.txt")));
    }

    #[test]
    fn a_file_that_shrinks_is_an_error_not_a_short_entry() {
        let mut reader = ExactReader {
            inner: &b"abc"[..],
            remaining: 5,
        };
        let err = io::copy(&mut reader, &mut io::sink()).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
    }

    /// A sink that, at its first write, runs `change` on the tree being archived: as a
    /// deploy or a rename would, mid-run.
    struct ChangeOnWrite<F: FnMut()> {
        change: Option<F>,
    }

    impl<F: FnMut()> Write for ChangeOnWrite<F> {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            if let Some(mut change) = self.change.take() {
                change();
            }
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_path_moved_or_repointed_mid_run_fails_the_archive() {
        let work = tempfile::tempdir().unwrap();
        let root = work.path().join("src");
        std::fs::create_dir_all(root.join("sub")).unwrap();
        std::fs::write(root.join("sub/x"), b"x").unwrap();
        let release = work.path().join("r2");
        std::fs::create_dir(&release).unwrap();
        let current = work.path().join("current");
        std::os::unix::fs::symlink(&root, &current).unwrap();
        let job = |path: PathBuf| FilesJob {
            paths: vec![path],
            follow: false,
            lifeboats_own: Vec::new(),
            include: Vec::new(),
            exclude: Vec::new(),
        };
        // A rename, and a symlink switched to another release.
        let moved = root.clone();
        let err = write_archive(
            "j",
            &job(root.clone()),
            &mut ChangeOnWrite {
                change: Some(|| {
                    std::fs::rename(&moved, moved.with_extension("old")).unwrap();
                    std::fs::create_dir(&moved).unwrap();
                }),
            },
        )
        .unwrap_err();
        assert!(
            err.message().contains("was moved, removed or replaced"),
            "{}",
            err.message()
        );
        let mut followed = current.clone().into_os_string();
        followed.push("/");
        let err = write_archive(
            "j",
            &job(PathBuf::from(followed)),
            &mut ChangeOnWrite {
                change: Some(|| {
                    std::fs::remove_file(&current).unwrap();
                    std::os::unix::fs::symlink(&release, &current).unwrap();
                }),
            },
        )
        .unwrap_err();
        assert!(
            err.message().contains("was moved, removed or replaced"),
            "{}",
            err.message()
        );
        // Left alone, the same paths archive.
        write_archive("j", &job(current.clone()), &mut io::sink()).unwrap();
    }

    #[test]
    fn archive_names_drop_the_root() {
        assert_eq!(
            archive_name(Path::new("/etc/nginx/nginx.conf")),
            PathBuf::from("etc/nginx/nginx.conf")
        );
    }
}
