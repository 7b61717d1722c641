//! Storage: one small async trait that every repository backend implements, with the
//! contract of each method stated here. Backends: a local directory ([`local`]) and S3
//! ([`s3`]). Keys are relative to the repository root, use '/' as separator, and never
//! contain empty, '.' or '..' segments. Depends on `error` only; aws-sdk-s3 appears only in
//! [`s3`].

pub mod local;
pub mod parts;
pub mod s3;

use std::fmt;
use std::ops::Range;

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use chrono::{DateTime, Utc};
use futures::StreamExt;
use futures::stream::BoxStream;

pub use parts::{PartSender, PartStream};

type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// A stream of an object's bytes, in the order stored.
pub type ByteStream = BoxStream<'static, Result<Bytes, StoreError>>;

/// An object's bytes as pieces, each with the offset it starts at, in no set order: several
/// ranges arrive at once, and none waits for the one before it.
pub type PieceStream = BoxStream<'static, Result<(u64, Bytes), StoreError>>;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("object '{key}' does not exist")]
    NotFound { key: String },
    #[error("object '{key}' already exists")]
    AlreadyExists { key: String },
    /// The body stream ended without its end marker: the producer failed, so the upload was
    /// abandoned (and aborted) instead of storing a truncated object.
    #[error("upload of '{key}' was abandoned because its source stopped before the end")]
    Abandoned { key: String },
    #[error("invalid object key '{key}': {reason}")]
    InvalidKey { key: String, reason: &'static str },
    #[error("unable to {operation} '{key}': {message}")]
    Backend {
        operation: &'static str,
        key: String,
        message: String,
        #[source]
        source: Option<BoxError>,
    },
}

impl StoreError {
    pub fn backend(operation: &'static str, key: &str, message: impl Into<String>) -> Self {
        StoreError::Backend {
            operation,
            key: key.to_string(),
            message: message.into(),
            source: None,
        }
    }

    pub fn io(operation: &'static str, key: &str, err: std::io::Error) -> Self {
        if err.kind() == std::io::ErrorKind::NotFound {
            return StoreError::NotFound {
                key: key.to_string(),
            };
        }
        StoreError::Backend {
            operation,
            key: key.to_string(),
            message: err.to_string(),
            source: None,
        }
    }

    pub fn is_not_found(&self) -> bool {
        matches!(self, StoreError::NotFound { .. })
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectMeta {
    pub key: String,
    pub size: u64,
    pub last_modified: Option<DateTime<Utc>>,
}

/// What a completed `put` stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PutReceipt {
    pub size: u64,
    /// How many parts a multipart upload took (1 for a single request), and the largest.
    pub parts: u32,
    pub largest_part: u64,
}

/// A store's own time, read as nearly as the store lets it be: `remote` is what its clock
/// said at the moment this host's clock said `local`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClockReading {
    pub local: DateTime<Utc>,
    pub remote: DateTime<Utc>,
    /// How far off `local` may be from the moment `remote` was taken: half the time the
    /// reading took (a busy host can take seconds), plus the store's own rounding.
    pub uncertainty: chrono::Duration,
}

impl ClockReading {
    /// How far the store's clock is ahead of this host's (negative: behind).
    pub fn skew(&self) -> chrono::Duration {
        self.remote - self.local
    }
}

/// An upload that was started and neither completed nor aborted: an S3 multipart upload,
/// or a local temp file left by a killed process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IncompleteUpload {
    pub key: String,
    pub id: String,
    pub initiated: Option<DateTime<Utc>>,
}

/// What `delete_unless_retained` did with an object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Deletion {
    /// Removed, or was already gone; in a bucket that keeps versions, `versions` stored
    /// versions (and delete markers) of the key were removed with it.
    Deleted { versions: u32 },
    /// Left in place: a retention lock or legal hold protects it, until the date if known.
    Retained { until: Option<DateTime<Utc>> },
}

/// A bucket that keeps versions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Versioning {
    /// `Enabled`, or `Suspended` (versions made before are still kept).
    pub status: String,
    /// Whether a lifecycle rule expires noncurrent versions; `None` when it could not be read.
    pub noncurrent_expire: Option<bool>,
}

/// Whether a store really keeps objects immutable, as found by writing a probe object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LockSupport {
    /// The backend has no notion of locks (a local directory).
    Unsupported,
    /// The S3 server does not implement Object Lock (it answers `NotImplemented`, HTTP 501,
    /// as Garage does).
    NotImplemented,
    /// The bucket does not have Object Lock enabled.
    NotEnabled,
    /// The server accepted a locked write but let the probe be deleted: the lock is not real.
    NotEnforced,
    /// A locked probe could not be deleted before its date.
    Enforced,
}

/// How a store reads a large object: as ranges of `range_bytes`, `streams` at once; 0
/// bytes: whole, in one read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadAhead {
    pub streams: u32,
    pub range_bytes: u64,
}

impl ReadAhead {
    /// Streams in flight while reading an object of `size` bytes.
    pub fn streams_for(&self, size: u64) -> u32 {
        let ranges = size.div_ceil(self.range_bytes.max(1)).max(1);
        u32::try_from(ranges)
            .unwrap_or(u32::MAX)
            .min(self.streams.max(1))
    }
}

#[async_trait]
pub trait Store: Send + Sync + fmt::Debug {
    /// Where this store keeps its objects, for messages: `s3://bucket/prefix` or a path.
    fn location(&self) -> String;

    /// How a large object is read: ranges of this many bytes, this many in flight at once.
    fn read_ahead(&self) -> ReadAhead {
        ReadAhead {
            streams: 1,
            range_bytes: 0,
        }
    }

    /// Stores the whole body under `key`, replacing any object there. Atomic: readers see the
    /// old object or the complete new one, never a part. If the body is abandoned (its sender
    /// dropped without `finish`) or any write fails, nothing is stored and no incomplete
    /// upload is left behind.
    async fn put(&self, key: &str, body: PartStream) -> Result<PutReceipt, StoreError>;

    /// Stores `body` under `key` only if no object is there; `AlreadyExists` otherwise.
    /// Atomic in the same way as `put`.
    async fn create_if_absent(&self, key: &str, body: Bytes) -> Result<(), StoreError>;

    /// Streams the object, or the byte `range` of it (end exclusive). `NotFound` if missing.
    async fn get(&self, key: &str, range: Option<Range<u64>>) -> Result<ByteStream, StoreError>;

    /// The whole object, which should be `size` bytes, as pieces at their offsets: for a
    /// reader that writes them into a file where they belong. Each byte comes once; a
    /// reader must still check that the pieces cover `size` bytes and no more. A store that
    /// reads ranges at once refuses an object of another size before handing on a byte.
    async fn get_pieces(&self, key: &str, _size: u64) -> Result<PieceStream, StoreError> {
        Ok(in_order(self.get(key, None).await?))
    }

    /// Size and time of the object. `NotFound` if missing.
    async fn head(&self, key: &str) -> Result<ObjectMeta, StoreError>;

    /// Every object whose key starts with `prefix`, sorted by key. Incomplete uploads are
    /// not objects and are never listed here.
    async fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>, StoreError>;

    /// Up to `max` objects under `prefix` whose keys sort after `start_after`, sorted by key:
    /// one page of a listing too large to hold whole. An empty page means the end.
    async fn list_page(
        &self,
        prefix: &str,
        start_after: Option<&str>,
        max: usize,
    ) -> Result<Vec<ObjectMeta>, StoreError>;

    /// Removes the object. Idempotent: removing a missing object succeeds.
    async fn delete(&self, key: &str) -> Result<(), StoreError>;

    /// Removes the object unless a retention lock or legal hold still protects it. Where
    /// objects are versioned (Object Lock), the version itself is removed, so no hidden copy
    /// stays behind a delete marker. Idempotent.
    async fn delete_unless_retained(&self, key: &str) -> Result<Deletion, StoreError> {
        self.delete(key)
            .await
            .map(|()| Deletion::Deleted { versions: 0 })
    }

    /// Whether the store keeps old versions of what is replaced or removed, and whether a
    /// lifecycle rule expires them. `None` where the store has no versions.
    async fn versioning(&self) -> Result<Option<Versioning>, StoreError> {
        Ok(None)
    }

    /// Writes, checks and removes a short-lived locked probe under `probe_key`.
    async fn probe_lock(&self, _probe_key: &str) -> Result<LockSupport, StoreError> {
        Ok(LockSupport::Unsupported)
    }

    /// The store's own clock: an S3 server's `Date` header on a request for `probe_key`
    /// (which need not exist), a file system's time on a file it makes and removes at once.
    /// `None` when the store has no clock of its own to read.
    async fn clock(&self, _probe_key: &str) -> Result<Option<ClockReading>, StoreError> {
        Ok(None)
    }

    /// Uploads under `prefix` that were started and never completed or aborted.
    async fn list_incomplete(&self, prefix: &str) -> Result<Vec<IncompleteUpload>, StoreError>;

    /// Discards an incomplete upload. Idempotent.
    async fn abort_incomplete(&self, upload: &IncompleteUpload) -> Result<(), StoreError>;
}

/// Reads a whole (small) object into memory: manifests and markers.
pub async fn get_bytes(store: &dyn Store, key: &str) -> Result<Bytes, StoreError> {
    get_range_bytes(store, key, None).await
}

/// Reads the byte `range` of an object (clamped to its size), or all of it, into memory.
pub async fn get_range_bytes(
    store: &dyn Store,
    key: &str,
    range: Option<Range<u64>>,
) -> Result<Bytes, StoreError> {
    let mut stream = store.get(key, range).await?;
    let mut buf = BytesMut::new();
    while let Some(chunk) = stream.next().await {
        buf.extend_from_slice(&chunk?);
    }
    Ok(buf.freeze())
}

/// Hands `each` the objects under `prefix` a page of `page_size` at a time, in key order:
/// for listings too large to hold. Removing keys already handed over does not disturb it.
pub async fn for_each_page(
    store: &dyn Store,
    prefix: &str,
    page_size: usize,
    mut each: impl AsyncFnMut(Vec<ObjectMeta>),
) -> Result<(), StoreError> {
    let mut after: Option<String> = None;
    loop {
        let page = store.list_page(prefix, after.as_deref(), page_size).await?;
        let Some(last) = page.last() else {
            return Ok(());
        };
        after = Some(last.key.clone());
        each(page).await;
    }
}

/// The pieces of a stream read in order from its first byte.
pub fn in_order(stream: ByteStream) -> PieceStream {
    stream
        .scan(0u64, |offset, item| {
            let piece = item.map(|bytes| {
                let at = *offset;
                *offset += bytes.len() as u64;
                (at, bytes)
            });
            futures::future::ready(Some(piece))
        })
        .boxed()
}

/// Stores a small in-memory object.
pub async fn put_bytes(
    store: &dyn Store,
    key: &str,
    body: Bytes,
) -> Result<PutReceipt, StoreError> {
    store.put(key, PartStream::from_bytes(body)).await
}

pub(crate) fn validate_key(key: &str) -> Result<(), StoreError> {
    let invalid = |reason| StoreError::InvalidKey {
        key: key.to_string(),
        reason,
    };
    if key.is_empty() {
        return Err(invalid("empty"));
    }
    if key.starts_with('/') {
        return Err(invalid("starts with '/'"));
    }
    if key
        .split('/')
        .any(|segment| segment.is_empty() || segment == "." || segment == "..")
    {
        return Err(invalid("has an empty, '.' or '..' segment"));
    }
    Ok(())
}
