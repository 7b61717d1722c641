//! Moves one object between a pipeline and the repositories, in both directions:
//! `store_object` runs a source through the encode pipeline into every repository at once;
//! `read_object` runs one stored object through the decode pipeline into a consumer.

use std::io::{self, Read, Write};
use std::path::Path;
use std::sync::Arc;

use futures::stream::BoxStream;
use futures::{StreamExt, TryStreamExt};
use tokio_util::io::{StreamReader, SyncIoBridge};

use crate::error::{Error, ErrorKind, Result};
use crate::keys::{self, Identity, Keyring, OpenError, Recipients};
use crate::layout;
use crate::manifest::{Manifest, ObjectEntry};
use crate::pipeline::{self, CHANNEL_BOUND, DecodeError, Digests, EncodeOptions, ObjectWriter};
use crate::progress::{self, CountingReader, CountingWriter};
use crate::repository::Repository;
use crate::storage::{self, PartStream, StoreError};

/// What `store_object` stored: the digests, the producer's value, and the repositories
/// (by index into the slice given) that failed to store it, each with its cause.
pub struct Stored<T> {
    pub digests: Digests,
    pub value: T,
    pub failed: Vec<(usize, Error)>,
}

/// Streams what `produce` writes through the pipeline into `key` in every repository at
/// once; the source is read and compressed once. A repository that fails drops out and the
/// others go on (its upload is aborted by its store). Fails when the source fails — then
/// every upload is abandoned — or when no repository stored the object.
pub async fn store_object<T, F>(
    repositories: &[Repository],
    key: &str,
    options: EncodeOptions,
    produce: F,
) -> Result<Stored<T>>
where
    T: Send + 'static,
    F: FnOnce(&mut dyn Write) -> Result<T> + Send + 'static,
{
    store_with(
        repositories,
        key,
        move |senders| ObjectWriter::new(&options, senders),
        produce,
    )
    .await
}

/// Like `store_object`, for a source that writes a zstd stream itself (compressed where it
/// runs): stored as it comes; decoded on the way for the raw digests, and into `inspect`.
pub async fn store_precompressed_object<T, F>(
    repositories: &[Repository],
    key: &str,
    recipients: Option<Recipients>,
    inspect: Box<dyn Write + Send>,
    produce: F,
) -> Result<Stored<T>>
where
    T: Send + 'static,
    F: FnOnce(&mut dyn Write) -> Result<T> + Send + 'static,
{
    store_with(
        repositories,
        key,
        move |senders| ObjectWriter::precompressed(senders, recipients.as_ref(), inspect),
        produce,
    )
    .await
}

async fn store_with<T, F, W>(
    repositories: &[Repository],
    key: &str,
    make_writer: W,
    produce: F,
) -> Result<Stored<T>>
where
    T: Send + 'static,
    F: FnOnce(&mut dyn Write) -> Result<T> + Send + 'static,
    W: FnOnce(Vec<crate::storage::PartSender>) -> io::Result<ObjectWriter> + Send + 'static,
{
    let mut senders = Vec::with_capacity(repositories.len());
    let mut uploads = Vec::with_capacity(repositories.len());
    for repository in repositories {
        let (sender, stream) = PartStream::channel(CHANNEL_BOUND);
        senders.push(sender);
        let store = repository.store.clone();
        let owned_key = key.to_string();
        uploads.push(tokio::spawn(
            async move { store.put(&owned_key, stream).await },
        ));
    }

    let label = object_label(key);
    let producer = tokio::task::spawn_blocking(move || -> Result<(Digests, T)> {
        let mut writer = make_writer(senders).map_err(|e| {
            Error::new(ErrorKind::Source, "unable to start the zstd encoder").with_source(e)
        })?;
        let mut task = progress::start(&format!("backup {label}"), None);
        let value = produce(&mut CountingWriter {
            inner: &mut writer,
            task: task.as_mut(),
        })?;
        task.finish();
        let digests = writer.finish().map_err(|e| {
            // A source stream that does not decode is the source's fault, not a store's.
            let kind = if e.kind() == io::ErrorKind::InvalidData {
                ErrorKind::Source
            } else {
                ErrorKind::Storage
            };
            Error::new(kind, "unable to finish the upload").with_source(e)
        })?;
        Ok((digests, value))
    });

    let produced = producer.await.unwrap_or_else(|e| {
        Err(Error::new(ErrorKind::Source, "the backup source stopped unexpectedly").with_source(e))
    });
    let outcomes = upload_outcomes(repositories, uploads, key).await;
    let (digests, value) = match produced {
        Ok(produced) => produced,
        // The source failed, or stopped because every repository had (a full disk, a
        // read-only one: the source then sees only that nobody reads what it writes): the
        // first repository's own error is the cause in that case. A source that fails on its
        // own leaves the uploads abandoned, not failed.
        Err(source_failure) => {
            let store_failures: Vec<Error> = outcomes
                .into_iter()
                .filter_map(|o| o.err().flatten())
                .collect();
            let every_store_failed = store_failures.len() == repositories.len();
            let store_failure = store_failures.into_iter().next();
            return Err(
                match (source_failure.kind(), every_store_failed, store_failure) {
                    (ErrorKind::Storage, _, Some(store_failure))
                    | (_, true, Some(store_failure)) => store_failure,
                    _ => source_failure,
                },
            );
        }
    };
    let mut failed = Vec::new();
    for (index, (repository, outcome)) in repositories.iter().zip(outcomes).enumerate() {
        let failure = match outcome {
            Ok(size) if size == digests.size => continue,
            Ok(size) => Error::new(
                ErrorKind::Storage,
                format!(
                    "unable to store object '{key}' in repository '{}': it stored {size} bytes of {}",
                    repository.name, digests.size
                ),
            ),
            Err(cause) => cause.unwrap_or_else(|| {
                Error::new(
                    ErrorKind::Storage,
                    format!(
                        "unable to store object '{key}' in repository '{}': the upload was abandoned",
                        repository.name
                    ),
                )
            }),
        };
        failed.push((index, failure));
    }
    if failed.len() == repositories.len() {
        return Err(failed.swap_remove(0).1);
    }
    Ok(Stored {
        digests,
        value,
        failed,
    })
}

/// Each repository's outcome: stored (with the size it took), or why not. An upload the
/// producer abandoned is no fault of the repository (`Err(None)`).
async fn upload_outcomes(
    repositories: &[Repository],
    uploads: Vec<
        tokio::task::JoinHandle<std::result::Result<crate::storage::PutReceipt, StoreError>>,
    >,
    key: &str,
) -> Vec<std::result::Result<u64, Option<Error>>> {
    let mut outcomes: Vec<std::result::Result<u64, Option<Error>>> = Vec::new();
    for (repository, upload) in repositories.iter().zip(uploads) {
        outcomes.push(match upload.await {
            Ok(Ok(receipt)) => Ok(receipt.size),
            Ok(Err(StoreError::Abandoned { .. })) => Err(None),
            Ok(Err(e)) => Err(Some(repository.error(&format!("store object '{key}'"), e))),
            Err(e) => Err(Some(
                Error::new(
                    ErrorKind::Storage,
                    format!(
                        "unable to store object '{key}' in repository '{}'",
                        repository.name
                    ),
                )
                .with_source(e),
            )),
        });
    }
    outcomes
}

/// "jobs/db/backups/ID/app.dump.zst" → "db/ID/app.dump.zst", for progress lines.
fn object_label(key: &str) -> String {
    key.strip_prefix("jobs/")
        .unwrap_or(key)
        .replacen("/backups/", "/", 1)
}

/// The identities that open `object` (at `place`), or None when it is not encrypted.
fn identities_for(
    keyring: &Keyring,
    object: &ObjectEntry,
    place: &str,
) -> Result<Option<Arc<Vec<Identity>>>> {
    if !object.is_encrypted() {
        return Ok(None);
    }
    keyring.identities(place).map(Some)
}

/// A stored object opened for a blocking reader, with what decrypting it needs.
struct Opened {
    key: String,
    /// "object 'KEY' in repository 'NAME'", for messages.
    place: String,
    identities: Option<Arc<Vec<Identity>>>,
    reader: SyncIoBridge<StreamReader<BoxStream<'static, io::Result<bytes::Bytes>>, bytes::Bytes>>,
}

/// One object of a backup as a repository stores it: what a restore, verify or rekey
/// reads, checks or re-encrypts.
#[derive(Clone, Copy)]
pub struct StoredObject<'a> {
    pub repository: &'a Repository,
    pub manifest: &'a Manifest,
    pub object: &'a ObjectEntry,
}

impl StoredObject<'_> {
    fn key(&self) -> String {
        layout::object_key(&self.manifest.job, &self.manifest.id, &self.object.name)
    }

    /// "object 'KEY' in repository 'NAME'", for messages.
    fn place(&self) -> String {
        format!(
            "object '{}' in repository '{}'",
            self.key(),
            self.repository.name
        )
    }

    async fn open(&self, keyring: &Keyring) -> Result<Opened> {
        let StoredObject {
            repository,
            manifest,
            object,
        } = *self;
        let (key, place) = (self.key(), self.place());
        let identities = identities_for(keyring, object, &place)?;
        let stream = repository
            .open_object(&manifest.job, &manifest.id, &object.name)
            .await?;
        let reader = SyncIoBridge::new(StreamReader::new(stream.map_err(io::Error::other).boxed()));
        Ok(Opened {
            key,
            place,
            identities,
            reader,
        })
    }

    /// Checks, by reading only its header, that `keyring` opens the encrypted `object`: a
    /// restore finds out it has the wrong key before it touches anything.
    pub async fn check_key(&self, keyring: &Keyring) -> Result<()> {
        let StoredObject {
            repository, object, ..
        } = *self;
        let (key, place) = (self.key(), self.place());
        let Some(identities) = identities_for(keyring, object, &place)? else {
            return Ok(());
        };
        let header =
            storage::get_range_bytes(repository.store.as_ref(), &key, Some(0..keys::HEADER_READ))
                .await
                .map_err(|e| repository.error(&format!("read object '{key}'"), e))?;
        match keys::open(&header[..], &identities) {
            Ok(_) => Ok(()),
            Err(OpenError::NoMatchingKey) => Err(keyring.no_match(&place, &object.recipients)),
            Err(OpenError::Damaged(problem)) => Err(Error::new(
                ErrorKind::Verification,
                format!("damaged {place}: {problem}"),
            )),
        }
    }

    /// Streams one object of `manifest` from `repository` through the decode pipeline into
    /// `consume` (on a blocking thread), decrypting it with `keyring` when it is encrypted.
    /// Returns Ok only when both checksums match.
    pub async fn read<T, F>(&self, keyring: &Keyring, consume: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&mut dyn Read) -> io::Result<T> + Send + 'static,
    {
        let StoredObject {
            manifest, object, ..
        } = *self;
        let Opened {
            key,
            place,
            identities,
            reader,
        } = self.open(keyring).await?;
        let expected = object.digests();
        let label = format!("restore {}", object.name);
        let outcome = tokio::task::spawn_blocking(move || {
            decode_with_progress(
                reader,
                &expected,
                pipeline::StoredCheck::Check,
                identities.as_deref(),
                &label,
                consume,
            )
        })
        .await
        .map_err(|e| {
            Error::new(ErrorKind::Storage, format!("unable to read object '{key}'")).with_source(e)
        })?;
        outcome.map_err(|e| decode_failure(place, &manifest.job, object, keyring, e))
    }

    /// Re-encrypts `object` of `manifest` in `repository` to `recipients`, streaming: its zstd
    /// stream is decrypted with `keyring` (when it is encrypted), encrypted again and stored as
    /// `new_name` beside it, while it is decompressed on the way to check the raw checksum.
    /// Returns the new object's entry; the old object is left for the caller to remove once
    /// the manifest names the new one.
    pub async fn reseal(
        &self,
        keyring: &Keyring,
        recipients: &Recipients,
        new_name: &str,
    ) -> Result<ObjectEntry> {
        let StoredObject {
            repository,
            manifest,
            object,
        } = *self;
        let new_key = layout::object_key(&manifest.job, &manifest.id, new_name);
        let Opened {
            place,
            identities,
            reader,
            ..
        } = self.open(keyring).await?;
        let expected = object.digests();
        let (job, entry, failure_keyring) = (manifest.job.clone(), object.clone(), keyring.clone());
        let failure_place = place.clone();
        let stored = store_precompressed_object(
            std::slice::from_ref(repository),
            &new_key,
            Some(recipients.clone()),
            Box::new(io::sink()),
            move |out| {
                pipeline::copy_unsealed(
                    reader,
                    &expected,
                    identities.as_deref().map(Vec::as_slice),
                    out,
                )
                .map_err(|e| decode_failure(failure_place, &job, &entry, &failure_keyring, e))
            },
        )
        .await?;
        let digests = stored.digests;
        if (digests.raw_size, digests.raw_sha256.as_str())
            != (object.raw_size, object.raw_sha256.as_str())
        {
            let _ = repository.store.delete(&new_key).await;
            return Err(Error::new(
                ErrorKind::Verification,
                format!(
                    "unable to re-encrypt {place}: it decodes to {} bytes with sha256 {}, the manifest says {} bytes with {}",
                    digests.raw_size, digests.raw_sha256, object.raw_size, object.raw_sha256
                ),
            ));
        }
        let mut entry = ObjectEntry::stored(object.logical_name(), &digests, Some(recipients));
        entry.name = new_name.to_string();
        entry.database = object.database.clone();
        Ok(entry)
    }

    /// Downloads one object of `manifest` as it is stored (compressed) into `file` (made by the
    /// caller, in a directory it holds, open to read and write: the checks read back what
    /// arrived), checking its stored size and sha256. For restores that stage before they
    /// decode.
    pub async fn download(&self, file: std::fs::File) -> Result<Downloaded> {
        self.download_checked(file, &pipeline::Checked::default())
            .await
    }

    /// Like [`StoredObject::download`], telling `checked` how far the file is written and
    /// checked as it goes, for a [`StagedObject::decode_following`] of it; it stops once that
    /// reader gave up.
    ///
    /// The ranges of the object are written where they belong as they arrive, several at
    /// once, none waiting for the one before it; the checks follow the part of the file that
    /// has arrived from its first byte, reading it back.
    pub async fn download_checked(
        &self,
        file: std::fs::File,
        checked: &pipeline::Checked,
    ) -> Result<Downloaded> {
        let started = std::time::Instant::now();
        let place = self.place();
        let staged_error = |e: io::Error| {
            Error::new(
                ErrorKind::Target,
                format!("unable to write the staged copy of {place}"),
            )
            .with_source(e)
        };
        let reader = match file.try_clone() {
            Ok(reader) => reader,
            Err(e) => {
                checked.fail();
                return Err(staged_error(e));
            }
        };
        let arrived = pipeline::Checked::default();
        let checking = self.check(
            Box::new(pipeline::FollowingReader::new(reader, arrived.clone())),
            Box::new(io::sink()),
            "download",
            checked.clone(),
            started,
        );
        let (store, key, size) = (self.repository.store.clone(), self.key(), self.object.size);
        let (writer_arrived, writer_checked) = (arrived.clone(), checked.clone());
        let writing = tokio::task::spawn_blocking(move || {
            write_pieces(
                store.as_ref(),
                &key,
                size,
                &file,
                &writer_arrived,
                &writer_checked,
            )
        });
        let wrote = writing
            .await
            .unwrap_or_else(|e| Err(Staging::Lost(e.to_string())));
        match &wrote {
            Ok(()) => arrived.complete(size),
            Err(_) => arrived.fail(),
        }
        let checked_outcome = checking.await;
        match wrote {
            Ok(()) => checked_outcome,
            Err(failure) => {
                checked.fail();
                Err(match failure {
                    Staging::Store(e) => self
                        .repository
                        .error(&format!("read object '{}'", self.key()), e),
                    Staging::Write(e) => staged_error(e),
                    Staging::Damaged(detail) => decode_failure(
                        place.clone(),
                        &self.manifest.job,
                        self.object,
                        &Keyring::default(),
                        DecodeError::StoredMismatch(detail),
                    ),
                    Staging::Lost(why) => Error::new(
                        ErrorKind::Storage,
                        format!("unable to download {place}: {why}"),
                    ),
                    // The check failed or the reader stopped; either says why.
                    Staging::Stopped => match checked_outcome {
                        Err(e) => e,
                        Ok(_) => Error::new(
                            ErrorKind::Target,
                            format!("the download of {place} was stopped: what read it gave up"),
                        ),
                    },
                })
            }
        }
    }

    /// Reads one object of `manifest` as it is stored and checks its stored size and sha256
    /// only: what can be checked of an encrypted object without its key.
    pub async fn check_stored(&self) -> Result<()> {
        let started = std::time::Instant::now();
        let stream = self
            .repository
            .open_object(&self.manifest.job, &self.manifest.id, &self.object.name)
            .await?;
        let reader = SyncIoBridge::new(StreamReader::new(stream.map_err(io::Error::other)));
        self.check(
            Box::new(reader),
            Box::new(io::sink()),
            "verify",
            pipeline::Checked::default(),
            started,
        )
        .await
        .map(|_| ())
    }

    /// Copies `stored` into `out`, checking it against the manifest's digests (and telling
    /// `checked` how far it is checked), on a thread of its own.
    async fn check(
        &self,
        stored: Box<dyn Read + Send>,
        out: Box<dyn Write + Send>,
        verb: &str,
        checked: pipeline::Checked,
        started: std::time::Instant,
    ) -> Result<Downloaded> {
        let StoredObject {
            repository,
            manifest,
            object,
        } = *self;
        let key = self.key();
        let expected = object.digests();
        let label = format!("{verb} {}", object.name);
        let outcome = tokio::task::spawn_blocking(move || {
            let mut task = progress::start(&label, Some(expected.size));
            let mut out = io::BufWriter::with_capacity(pipeline::CHUNK_SIZE, out);
            let mut reader = FirstByte {
                inner: stored,
                at: None,
            };
            let outcome = pipeline::copy_stored(
                &mut reader,
                &expected,
                &mut CountingWriter {
                    inner: &mut out,
                    task: task.as_mut(),
                },
                &checked,
            );
            task.finish();
            let first_byte = reader.at.map_or(started.elapsed(), |at| at - started);
            outcome.map(|_| (started.elapsed(), first_byte))
        })
        .await
        .map_err(|e| {
            Error::new(ErrorKind::Storage, format!("unable to read object '{key}'")).with_source(e)
        })?;
        let (seconds, first_byte) = outcome.map_err(|e| {
            decode_failure(self.place(), &manifest.job, object, &Keyring::default(), e)
        })?;
        Ok(Downloaded {
            seconds: seconds.as_secs_f64(),
            first_byte_seconds: first_byte.as_secs_f64(),
            streams: repository.store.read_ahead().streams_for(object.size),
        })
    }
}

/// Why writing an object's pieces into its staged file stopped.
enum Staging {
    Store(StoreError),
    /// The object is not the size its manifest says.
    Damaged(String),
    Write(io::Error),
    /// The thread writing them died.
    Lost(String),
    /// The check of what arrived failed, or what reads the staged file gave up.
    Stopped,
}

/// Writes the pieces of `key`, `size` bytes, into `file` where each belongs, telling
/// `arrived` how much of the file has arrived from its first byte. Pieces that overlap or
/// reach past `size` are refused before they are written: a store (or a server) that sends
/// them is not sending the object that was stored. Runs on a blocking thread.
fn write_pieces(
    store: &dyn storage::Store,
    key: &str,
    size: u64,
    file: &std::fs::File,
    arrived: &pipeline::Checked,
    checked: &pipeline::Checked,
) -> std::result::Result<(), Staging> {
    use std::os::unix::fs::FileExt;
    // Room for the whole object up front: ranges written out of order then land in extents
    // laid out in order, and a full disk fails here, before a byte is downloaded. Where the
    // filesystem cannot allocate ahead, the writes allocate as they go.
    if size > 0 {
        match rustix::fs::fallocate(file, rustix::fs::FallocateFlags::empty(), 0, size) {
            Ok(()) | Err(rustix::io::Errno::OPNOTSUPP) => {}
            Err(e) => return Err(Staging::Write(e.into())),
        }
    }
    let runtime = tokio::runtime::Handle::current();
    let mut pieces = runtime
        .block_on(store.get_pieces(key, size))
        .map_err(Staging::Store)?;
    let mut received = pipeline::Arrived::default();
    while let Some(piece) = runtime.block_on(pieces.next()) {
        let (at, bytes) = piece.map_err(Staging::Store)?;
        let range = at..at.saturating_add(bytes.len() as u64);
        if range.end > size {
            return Err(Staging::Damaged(format!(
                "stored size is more than the {size} bytes the manifest says"
            )));
        }
        let prefix = received.add(range.clone()).map_err(|_| {
            Staging::Store(StoreError::backend(
                "download",
                key,
                format!(
                    "the bytes from {} to {} came twice; the object changed while it was read, run the command again",
                    range.start, range.end
                ),
            ))
        })?;
        file.write_all_at(&bytes, at).map_err(Staging::Write)?;
        if let Some(prefix) = prefix {
            arrived.advance(prefix);
        }
        if checked.is_stopped() {
            return Err(Staging::Stopped);
        }
    }
    if received.prefix() < size {
        return Err(Staging::Damaged(format!(
            "stored size is {} bytes, the manifest says {size}",
            received.prefix()
        )));
    }
    Ok(())
}

/// How a download went: what an RTO projection scales (see `rto_model`).
#[derive(Debug, Clone, Copy)]
pub struct Downloaded {
    pub seconds: f64,
    pub first_byte_seconds: f64,
    /// Ranges that were read at once.
    pub streams: u32,
}

/// A reader that notes when its first byte came.
struct FirstByte<R> {
    inner: R,
    at: Option<std::time::Instant>,
}

impl<R: Read> Read for FirstByte<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        if n > 0 && self.at.is_none() {
            self.at = Some(std::time::Instant::now());
        }
        Ok(n)
    }
}

/// An object that `StoredObject::download` staged at `path` from `repository`.
#[derive(Clone, Copy)]
pub struct StagedObject<'a> {
    pub path: &'a Path,
    pub repository: &'a Repository,
    pub manifest: &'a Manifest,
    pub object: &'a ObjectEntry,
    pub keyring: &'a Keyring,
}

impl StagedObject<'_> {
    /// Where it came from, for errors.
    fn place(&self) -> String {
        let key = layout::object_key(&self.manifest.job, &self.manifest.id, &self.object.name);
        format!("object '{key}' from repository '{}'", self.repository.name)
    }

    /// The staged file, opened, and what decrypts it when it is encrypted.
    fn open(&self) -> Result<(std::fs::File, Option<Arc<Vec<Identity>>>)> {
        let identities = identities_for(self.keyring, self.object, &self.place())?;
        let file = std::fs::File::open(self.path).map_err(|e| {
            Error::new(
                ErrorKind::Target,
                format!(
                    "unable to open the staged copy '{}' of {}",
                    self.path.display(),
                    self.place()
                ),
            )
            .with_source(e)
        })?;
        Ok((file, identities))
    }

    /// Decodes it into `consume`, on the calling thread. Returns Ok only when both
    /// checksums match.
    pub fn decode<T>(&self, consume: impl FnOnce(&mut dyn Read) -> io::Result<T>) -> Result<T> {
        let (file, _) = self.open()?;
        self.decode_file(file, consume)
    }

    /// Like [`StagedObject::decode`], from the staged copy already opened as `file` (by a
    /// caller that holds the directory it is in).
    pub fn decode_file<T>(
        &self,
        file: std::fs::File,
        consume: impl FnOnce(&mut dyn Read) -> io::Result<T>,
    ) -> Result<T> {
        self.decode_staged(file, pipeline::StoredCheck::Check, consume)
    }

    /// Decodes the staged copy opened as `file` into `consume` while
    /// [`StoredObject::download_checked`] still writes it, never reading past what `checked`
    /// says is checked, and checking the decompressed bytes. Returns Ok only when the whole
    /// object was downloaded and checked, and the decompressed bytes match.
    pub fn decode_following<T>(
        &self,
        file: std::fs::File,
        checked: pipeline::Checked,
        consume: impl FnOnce(&mut dyn Read) -> io::Result<T>,
    ) -> Result<T> {
        self.decode_staged(
            pipeline::FollowingReader::new(file, checked),
            pipeline::StoredCheck::AlreadyChecked,
            consume,
        )
    }

    fn decode_staged<R: Read + Send, T>(
        &self,
        stored: R,
        stored_check: pipeline::StoredCheck,
        consume: impl FnOnce(&mut dyn Read) -> io::Result<T>,
    ) -> Result<T> {
        let identities = identities_for(self.keyring, self.object, &self.place())?;
        let label = format!("restore {}", self.object.name);
        let outcome = decode_with_progress(
            stored,
            &self.object.digests(),
            stored_check,
            identities.as_deref(),
            &label,
            consume,
        );
        outcome.map_err(|e| {
            decode_failure(
                self.place(),
                &self.manifest.job,
                self.object,
                self.keyring,
                e,
            )
        })
    }

    /// Decodes it into `consume` without checking: a second reader of a copy that a
    /// [`StagedObject::decode`] of it checks.
    pub fn decode_unchecked<T>(
        &self,
        consume: impl FnOnce(&mut dyn Read) -> io::Result<T>,
    ) -> Result<T> {
        let (file, identities) = self.open()?;
        let read = (|| {
            let mut raw =
                pipeline::decode_unchecked(file, identities.as_deref().map(Vec::as_slice))?;
            consume(&mut raw)
        })();
        read.map_err(|e| {
            Error::new(
                ErrorKind::Target,
                format!(
                    "unable to read the staged copy '{}' of {}",
                    self.path.display(),
                    self.place()
                ),
            )
            .with_source(e)
        })
    }
}

/// `pipeline::decode` with a progress line labelled `label`.
fn decode_with_progress<R: Read + Send, T>(
    stored: R,
    expected: &Digests,
    stored_check: pipeline::StoredCheck,
    identities: Option<&Vec<Identity>>,
    label: &str,
    consume: impl FnOnce(&mut dyn Read) -> io::Result<T>,
) -> std::result::Result<T, DecodeError> {
    let mut task = progress::start(label, Some(expected.raw_size));
    let outcome = pipeline::decode_checking(
        stored,
        expected,
        stored_check,
        identities.map(Vec::as_slice),
        |raw| {
            consume(&mut CountingReader {
                inner: raw,
                task: task.as_mut(),
            })
        },
    );
    task.finish();
    outcome
}

/// Words a decode failure of `object`, at `place`.
fn decode_failure(
    place: String,
    job: &str,
    object: &ObjectEntry,
    keyring: &Keyring,
    e: DecodeError,
) -> Error {
    match e {
        DecodeError::Key(OpenError::NoMatchingKey) => keyring.no_match(&place, &object.recipients),
        DecodeError::Key(OpenError::Damaged(problem)) => Error::new(
            ErrorKind::Verification,
            format!("damaged {place}: {problem}"),
        ),
        DecodeError::Download(cause) => {
            Error::new(ErrorKind::Storage, format!("unable to download {place}")).with_source(cause)
        }
        DecodeError::StoredMismatch(detail) | DecodeError::RawMismatch(detail) => {
            Error::new(ErrorKind::Verification, format!("damaged {place}: {detail}")).with_hint(format!(
                "the copy in another repository may be intact: try `--from` another repository, then `lifeboat verify {job}`"
            ))
        }
        // What the object holds was refused (an archive entry that would reach outside its
        // target, more bytes than its manifest says): the object is at fault, not the target.
        DecodeError::Consumer(cause) if cause.kind() == io::ErrorKind::InvalidData => {
            Error::new(ErrorKind::Verification, format!("unable to unpack {place}"))
                .with_source(cause)
                .with_hint(format!(
                    "lifeboat does not write such backups: find out who else writes the repository, and try another copy with --from and `lifeboat verify {job}`"
                ))
        }
        DecodeError::Consumer(cause) => {
            Error::new(ErrorKind::Target, format!("unable to unpack {place}")).with_source(cause)
        }
    }
}
