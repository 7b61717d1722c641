//! A repository in a local directory (or a mounted filesystem). Writes go to a temp file in
//! the destination directory, are fsynced, renamed into place, and the directory is fsynced,
//! so a crash leaves the old object or the new one and never a torn file.

use std::io::{self, SeekFrom};
use std::ops::Range;
use std::path::{Path, PathBuf};

use async_trait::async_trait;
use bytes::Bytes;
use chrono::{DateTime, Utc};
use futures::StreamExt;
use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt};
use tokio_util::io::ReaderStream;

use super::{
    ByteStream, ClockReading, IncompleteUpload, ObjectMeta, PartStream, PutReceipt, Store,
    StoreError, validate_key,
};

/// Temp files carry this marker in their name; `list` hides them and `list_incomplete`
/// reports them.
const TEMP_MARKER: &str = ".lifeboat-tmp-";
const READ_CHUNK: usize = 1024 * 1024;

#[derive(Debug, Clone)]
pub struct LocalStore {
    root: PathBuf,
}

impl LocalStore {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        LocalStore { root: root.into() }
    }

    fn path_of(&self, key: &str) -> Result<PathBuf, StoreError> {
        validate_key(key)?;
        Ok(self.root.join(key))
    }

    /// Writes `body` into a new temp file beside `dest` and fsyncs it; the caller moves it.
    async fn write_temp(
        &self,
        key: &str,
        dest: &Path,
        mut body: PartStream,
    ) -> Result<
        (
            tempfile::TempPath,
            u64,
            crate::interrupt::RemovedOnInterrupt,
        ),
        StoreError,
    > {
        let dir = dest.parent().expect("keys always have a parent directory");
        let file_name = dest
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("object");
        let prefix = format!(".{file_name}{TEMP_MARKER}");
        // Another writer's delete removes a directory it leaves empty (see `delete`), maybe
        // between our making it and our temp file landing in it: make it again then.
        // Nothing new once the run is interrupted; a temp file being made is waited for.
        let Some(_creating) = crate::interrupt::creating() else {
            return Err(StoreError::backend("write", key, "the run was interrupted"));
        };
        let mut attempts = 0;
        let temp = loop {
            attempts += 1;
            tokio::fs::create_dir_all(dir)
                .await
                .map_err(|e| StoreError::io("create directory for", key, e))?;
            let (dir_owned, prefix) = (dir.to_path_buf(), prefix.clone());
            let made = tokio::task::spawn_blocking(move || {
                tempfile::Builder::new()
                    .prefix(&prefix)
                    .tempfile_in(dir_owned)
            })
            .await
            .map_err(|e| StoreError::backend("create temp file for", key, e.to_string()))?;
            match made {
                Ok(temp) => break temp,
                Err(e) if e.kind() == io::ErrorKind::NotFound && attempts < 5 => continue,
                Err(e) => return Err(StoreError::io("create temp file for", key, e)),
            }
        };
        let (file, temp_path) = temp.into_parts();
        let registered = crate::interrupt::RemovedOnInterrupt::new(&temp_path);
        drop(_creating);
        let mut file = tokio::fs::File::from_std(file);
        let mut size = 0u64;
        while let Some(chunk) = body.next(key).await? {
            file.write_all(&chunk)
                .await
                .map_err(|e| StoreError::io("write", key, e))?;
            size += chunk.len() as u64;
        }
        // tokio's File writes in the background and keeps a failed write's error (ENOSPC on
        // a full disk) for the next flush: sync_all alone would not report it.
        file.flush()
            .await
            .map_err(|e| StoreError::io("write", key, e))?;
        file.sync_all()
            .await
            .map_err(|e| StoreError::io("fsync", key, e))?;
        Ok((temp_path, size, registered))
    }

    async fn sync_dir(&self, key: &str, dir: &Path) -> Result<(), StoreError> {
        let dir = dir.to_path_buf();
        tokio::task::spawn_blocking(move || std::fs::File::open(&dir)?.sync_all())
            .await
            .map_err(|e| StoreError::backend("fsync directory of", key, e.to_string()))?
            .map_err(|e| StoreError::io("fsync directory of", key, e))
    }

    /// Calls `each` with the key and entry of every file under the deepest directory `prefix`
    /// names fully, in no particular order. Unsorted on purpose: a sorted walk holds every
    /// entry of a directory (a WAL archive's hundred thousand) to sort it.
    fn visit(
        &self,
        prefix: &str,
        mut each: impl FnMut(&str, &walkdir::DirEntry) -> io::Result<()>,
    ) -> io::Result<()> {
        let dir_part = prefix.rfind('/').map_or("", |i| &prefix[..i]);
        let start = self.root.join(dir_part);
        if !start.is_dir() {
            return Ok(());
        }
        for entry in walkdir::WalkDir::new(&start).follow_links(false) {
            let entry = entry.map_err(io::Error::other)?;
            if !entry.file_type().is_file() {
                continue;
            }
            let relative = entry
                .path()
                .strip_prefix(&self.root)
                .map_err(io::Error::other)?;
            if let Some(key) = relative.to_str() {
                each(key, &entry)?;
            }
        }
        Ok(())
    }

    /// Files whose key `keep` accepts, sorted by key. Only what is kept is held in memory.
    fn walk(&self, prefix: &str, keep: impl Fn(&str) -> bool) -> io::Result<Vec<ObjectMeta>> {
        let mut found = Vec::new();
        self.visit(prefix, |key, entry| {
            if keep(key) {
                let meta = entry.metadata().map_err(io::Error::other)?;
                found.push(ObjectMeta {
                    size: meta.len(),
                    last_modified: modified(&meta),
                    key: key.to_string(),
                });
            }
            Ok(())
        })?;
        found.sort_unstable_by(|a, b| a.key.cmp(&b.key));
        Ok(found)
    }
}

impl LocalStore {
    /// One page of `list_page`: an unsorted walk that keeps only the `max` smallest keys
    /// after `start_after`, so memory stays bounded however many files a directory holds.
    fn walk_page(
        &self,
        prefix: &str,
        start_after: Option<&str>,
        max: usize,
    ) -> io::Result<Vec<ObjectMeta>> {
        if max == 0 {
            return Ok(Vec::new());
        }
        let mut smallest: std::collections::BinaryHeap<String> =
            std::collections::BinaryHeap::new();
        self.visit(prefix, |key, _| {
            let wanted = key.starts_with(prefix)
                && !is_temp(key)
                && start_after.is_none_or(|after| key > after)
                && (smallest.len() < max || smallest.peek().is_some_and(|top| key < top.as_str()));
            if wanted {
                smallest.push(key.to_string());
                if smallest.len() > max {
                    smallest.pop();
                }
            }
            Ok(())
        })?;
        let mut page = Vec::with_capacity(smallest.len());
        for key in smallest.into_sorted_vec() {
            match std::fs::metadata(self.root.join(&key)) {
                Ok(meta) => page.push(ObjectMeta {
                    size: meta.len(),
                    last_modified: modified(&meta),
                    key,
                }),
                // Removed since the walk saw it: no longer an object.
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        Ok(page)
    }
}

fn modified(meta: &std::fs::Metadata) -> Option<DateTime<Utc>> {
    meta.modified().ok().map(DateTime::<Utc>::from)
}

/// The key a temp file was being written for; None if `key` is not a temp file.
fn original_key(key: &str) -> Option<String> {
    let (dir, name) = key.rsplit_once('/').unwrap_or(("", key));
    let original = name.strip_prefix('.')?.split(TEMP_MARKER).next()?;
    if !name.contains(TEMP_MARKER) {
        return None;
    }
    Some(match dir {
        "" => original.to_string(),
        _ => format!("{dir}/{original}"),
    })
}

fn is_temp(key: &str) -> bool {
    key.rsplit('/')
        .next()
        .is_some_and(|name| name.contains(TEMP_MARKER))
}

#[async_trait]
impl Store for LocalStore {
    fn location(&self) -> String {
        self.root.display().to_string()
    }

    async fn put(&self, key: &str, body: PartStream) -> Result<PutReceipt, StoreError> {
        let dest = self.path_of(key)?;
        let (temp, size, _registered) = self.write_temp(key, &dest, body).await?;
        let dest_owned = dest.clone();
        tokio::task::spawn_blocking(move || temp.persist(&dest_owned))
            .await
            .map_err(|e| StoreError::backend("rename into place", key, e.to_string()))?
            .map_err(|e| StoreError::io("rename into place", key, e.error))?;
        self.sync_dir(key, dest.parent().expect("has parent"))
            .await?;
        Ok(PutReceipt {
            size,
            parts: 1,
            largest_part: size,
        })
    }

    async fn create_if_absent(&self, key: &str, body: Bytes) -> Result<(), StoreError> {
        let dest = self.path_of(key)?;
        let (temp, _, _registered) = self
            .write_temp(key, &dest, PartStream::from_bytes(body))
            .await?;
        // link(2) fails with EEXIST atomically, which rename(2) would not.
        match tokio::fs::hard_link(&temp, &dest).await {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                return Err(StoreError::AlreadyExists {
                    key: key.to_string(),
                });
            }
            Err(e) => return Err(StoreError::io("create", key, e)),
        }
        drop(temp);
        self.sync_dir(key, dest.parent().expect("has parent")).await
    }

    async fn get(&self, key: &str, range: Option<Range<u64>>) -> Result<ByteStream, StoreError> {
        let path = self.path_of(key)?;
        // Non-blocking, so that a FIFO planted under a key fails here instead of waiting
        // for a writer forever; a regular file reads the same either way.
        let mut file = tokio::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&path)
            .await
            .map_err(|e| StoreError::io("open", key, e))?;
        let meta = file
            .metadata()
            .await
            .map_err(|e| StoreError::io("stat", key, e))?;
        if !meta.is_file() {
            return Err(StoreError::io(
                "open",
                key,
                std::io::Error::new(std::io::ErrorKind::InvalidData, "not a regular file"),
            ));
        }
        let len = meta.len();
        let (start, end) = match range {
            Some(r) => (r.start.min(len), r.end.min(len).max(r.start.min(len))),
            None => (0, len),
        };
        if start > 0 {
            file.seek(SeekFrom::Start(start))
                .await
                .map_err(|e| StoreError::io("seek", key, e))?;
        }
        let owned_key = key.to_string();
        let stream = ReaderStream::with_capacity(file.take(end - start), READ_CHUNK)
            .map(move |chunk| chunk.map_err(|e| StoreError::io("read", &owned_key, e)));
        Ok(stream.boxed())
    }

    async fn head(&self, key: &str) -> Result<ObjectMeta, StoreError> {
        let path = self.path_of(key)?;
        let meta = tokio::fs::metadata(&path)
            .await
            .map_err(|e| StoreError::io("stat", key, e))?;
        if !meta.is_file() {
            return Err(StoreError::NotFound {
                key: key.to_string(),
            });
        }
        Ok(ObjectMeta {
            key: key.to_string(),
            size: meta.len(),
            last_modified: modified(&meta),
        })
    }

    async fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>, StoreError> {
        let store = self.clone();
        let owned = prefix.to_string();
        tokio::task::spawn_blocking(move || {
            store.walk(&owned, |key| {
                key.starts_with(owned.as_str()) && !is_temp(key)
            })
        })
        .await
        .map_err(|e| StoreError::backend("list", prefix, e.to_string()))?
        .map_err(|e| StoreError::io("list", prefix, e))
    }

    async fn list_page(
        &self,
        prefix: &str,
        start_after: Option<&str>,
        max: usize,
    ) -> Result<Vec<ObjectMeta>, StoreError> {
        let store = self.clone();
        let owned = prefix.to_string();
        let after = start_after.map(str::to_string);
        tokio::task::spawn_blocking(move || store.walk_page(&owned, after.as_deref(), max))
            .await
            .map_err(|e| StoreError::backend("list", prefix, e.to_string()))?
            .map_err(|e| StoreError::io("list", prefix, e))
    }

    async fn delete(&self, key: &str) -> Result<(), StoreError> {
        let path = self.path_of(key)?;
        match tokio::fs::remove_file(&path).await {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(StoreError::io("delete", key, e)),
        }
        // Empty directories are not objects; removing them keeps the tree honest for people
        // who inspect it by hand. A directory that is not empty simply stays.
        let mut dir = path.parent().map(Path::to_path_buf);
        while let Some(current) = dir {
            if current == self.root || tokio::fs::remove_dir(&current).await.is_err() {
                break;
            }
            dir = current.parent().map(Path::to_path_buf);
        }
        Ok(())
    }

    /// The time the file system gives a file it makes now: the host's own clock, unless the
    /// repository is a network mount whose server keeps the time.
    async fn clock(&self, probe_key: &str) -> Result<Option<ClockReading>, StoreError> {
        let dest = self.path_of(probe_key)?;
        let dir = dest
            .parent()
            .expect("keys always have a parent directory")
            .to_path_buf();
        let prefix = format!(
            ".{}{TEMP_MARKER}",
            dest.file_name().and_then(|n| n.to_str()).unwrap_or("clock")
        );
        let owned_key = probe_key.to_string();
        tokio::task::spawn_blocking(move || {
            // A busy host can stall between the two looks at its clock: the best of three.
            let mut best: Option<ClockReading> = None;
            for _ in 0..3 {
                // A signal while the probe exists removes it: nothing is left behind.
                let Some(_creating) = crate::interrupt::creating() else {
                    return Ok(best);
                };
                let before = Utc::now();
                let probe = tempfile::Builder::new()
                    .prefix(&prefix)
                    .tempfile_in(&dir)
                    .map_err(|e| StoreError::io("create clock probe", &owned_key, e))?;
                let _removed = crate::interrupt::RemovedOnInterrupt::new(probe.path());
                let made = probe
                    .as_file()
                    .metadata()
                    .map_err(|e| StoreError::io("stat clock probe", &owned_key, e))?;
                let after = Utc::now();
                let Some(remote) = modified(&made) else {
                    return Ok(None);
                };
                let reading = ClockReading {
                    local: before + (after - before) / 2,
                    remote,
                    uncertainty: (after - before) / 2,
                };
                if best.is_none_or(|best| reading.uncertainty < best.uncertainty) {
                    best = Some(reading);
                }
                if reading.uncertainty < chrono::Duration::milliseconds(100) {
                    break;
                }
            }
            Ok(best)
        })
        .await
        .map_err(|e| StoreError::backend("read the clock of", probe_key, e.to_string()))?
    }

    async fn list_incomplete(&self, prefix: &str) -> Result<Vec<IncompleteUpload>, StoreError> {
        let store = self.clone();
        let owned = prefix.to_string();
        let found = tokio::task::spawn_blocking(move || {
            store.walk(&owned, |key| {
                original_key(key).is_some_and(|original| original.starts_with(owned.as_str()))
            })
        })
        .await
        .map_err(|e| StoreError::backend("list", prefix, e.to_string()))?
        .map_err(|e| StoreError::io("list", prefix, e))?;
        Ok(found
            .into_iter()
            .filter_map(|temp| {
                Some(IncompleteUpload {
                    key: original_key(&temp.key)?,
                    id: temp.key,
                    initiated: temp.last_modified,
                })
            })
            .collect())
    }

    async fn abort_incomplete(&self, upload: &IncompleteUpload) -> Result<(), StoreError> {
        self.delete(&upload.id).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn temp_files_are_incomplete_uploads_not_objects() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::new(dir.path());
        std::fs::create_dir_all(dir.path().join("a")).unwrap();
        std::fs::write(dir.path().join("a/.obj.zst.lifeboat-tmp-XyZ"), b"partial").unwrap();
        assert!(store.list("a/").await.unwrap().is_empty());
        let incomplete = store.list_incomplete("a/").await.unwrap();
        assert_eq!(incomplete.len(), 1);
        assert_eq!(incomplete[0].key, "a/obj.zst");
        store.abort_incomplete(&incomplete[0]).await.unwrap();
        assert!(store.list_incomplete("").await.unwrap().is_empty());
    }
}
