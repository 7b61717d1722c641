//! The `files` job: configured paths as one tar stream, keeping mode, owner, mtime and
//! symlinks. Archive names are the absolute paths without the leading '/', so a restore into
//! DIR puts `/etc/nginx/nginx.conf` at `DIR/etc/nginx/nginx.conf`.

use std::fs::File;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use globset::{Glob, GlobSet, GlobSetBuilder};

use crate::config::FilesJob;
use crate::error::{Error, ErrorKind, Result};

const READ_BUFFER: usize = 1024 * 1024;

/// What the archive holds.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ArchiveSummary {
    pub entries: u64,
    pub skipped: u64,
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

/// Writes the tar stream of `job`'s paths into `out`.
pub fn write_archive(
    job_name: &str,
    job: &FilesJob,
    out: &mut dyn Write,
) -> Result<ArchiveSummary> {
    let filter = PathFilter::new(&job.include, &job.exclude)?;
    let mut builder = tar::Builder::new(out);
    builder.follow_symlinks(false);
    builder.mode(tar::HeaderMode::Complete);
    let mut summary = ArchiveSummary::default();
    // The archive name each multiply-linked file was first stored under: later names of the
    // same inode are stored as hard links to it, so the data is stored, and restored, once.
    let mut linked: std::collections::HashMap<(u64, u64), PathBuf> = Default::default();

    for root in &job.paths {
        std::fs::symlink_metadata(root)
            .map_err(|e| source_error(job_name, "read path", root, e))?;
        let mut walker = walkdir::WalkDir::new(root)
            .follow_links(false)
            .sort_by_file_name()
            .into_iter();
        while let Some(entry) = walker.next() {
            let entry = entry.map_err(|e| {
                let path = e
                    .path()
                    .map(Path::to_path_buf)
                    .unwrap_or_else(|| root.clone());
                source_error(job_name, "read directory", &path, e)
            })?;
            let path = entry.path();
            if entry.depth() > 0 && filter.excluded(path) {
                if entry.file_type().is_dir() {
                    walker.skip_current_dir();
                }
                continue;
            }
            let name = archive_name(path);
            let file_type = entry.file_type();
            if file_type.is_dir() {
                builder
                    .append_dir(&name, path)
                    .map_err(|e| source_error(job_name, "archive directory", path, e))?;
            } else if file_type.is_symlink() {
                if !filter.included(path) {
                    continue;
                }
                builder
                    .append_path_with_name(path, &name)
                    .map_err(|e| source_error(job_name, "archive symlink", path, e))?;
            } else if file_type.is_file() {
                if !filter.included(path) {
                    continue;
                }
                use std::os::unix::fs::MetadataExt;
                // The open file decides: a name replaced since the directory was read (an
                // editor's rename) is stored as what it is now.
                use std::os::unix::fs::OpenOptionsExt;
                // Without blocking: a FIFO put in the name's place would wait for a writer.
                let file = std::fs::OpenOptions::new()
                    .read(true)
                    .custom_flags(libc::O_NONBLOCK)
                    .open(path)
                    .map_err(|e| source_error(job_name, "read file", path, e))?;
                let metadata = file
                    .metadata()
                    .map_err(|e| source_error(job_name, "read file", path, e))?;
                if !metadata.is_file() {
                    tracing::warn!(path = %path.display(), "skipping a file that is no longer a regular file");
                    summary.skipped += 1;
                    continue;
                }
                let inode = (metadata.dev(), metadata.ino());
                match linked.get(&inode) {
                    Some(first) if metadata.nlink() > 1 => {
                        let mut header = tar::Header::new_gnu();
                        header.set_metadata_in_mode(&metadata, tar::HeaderMode::Complete);
                        header.set_entry_type(tar::EntryType::Link);
                        header.set_size(0);
                        builder
                            .append_link(&mut header, &name, first)
                            .map_err(|e| source_error(job_name, "archive hard link", path, e))?;
                    }
                    _ => {
                        append_file(&mut builder, file, &metadata, &name)
                            .map_err(|e| source_error(job_name, "read file", path, e))?;
                        if metadata.nlink() > 1 {
                            linked.insert(inode, name.clone());
                        }
                    }
                }
            } else {
                tracing::warn!(path = %path.display(), "skipping a socket, fifo or device file");
                summary.skipped += 1;
                continue;
            }
            summary.entries += 1;
        }
    }
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
    Ok(summary)
}

/// Stores the open `file`, its header from the open file's `metadata`, so that name, size
/// and content describe one file.
fn append_file(
    builder: &mut tar::Builder<&mut dyn Write>,
    file: File,
    metadata: &std::fs::Metadata,
    name: &Path,
) -> io::Result<()> {
    let mut header = tar::Header::new_gnu();
    header.set_metadata_in_mode(metadata, tar::HeaderMode::Complete);
    // Large reads: tar copies in 8 KiB steps, which would otherwise be one syscall each. A
    // buffer no larger than the file: a 1 MiB one for each of thousands of small config files
    // cost an mmap and munmap apiece.
    let buffer = (metadata.len() as usize)
        .saturating_add(1)
        .clamp(8 * 1024, READ_BUFFER);
    let reader = ExactReader {
        inner: io::BufReader::with_capacity(buffer, file),
        remaining: metadata.len(),
    };
    builder.append_data(&mut header, name, reader)
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

    #[test]
    fn archive_names_drop_the_root() {
        assert_eq!(
            archive_name(Path::new("/etc/nginx/nginx.conf")),
            PathBuf::from("etc/nginx/nginx.conf")
        );
    }
}
