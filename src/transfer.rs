//! Moves one object between a pipeline and the repositories, in both directions:
//! `store_object` runs a source through the encode pipeline into every repository at once;
//! `read_object` runs one stored object through the decode pipeline into a consumer.

use std::io::{self, Read, Write};
use std::path::Path;

use futures::TryStreamExt;
use tokio_util::io::{StreamReader, SyncIoBridge};

use crate::error::{Error, ErrorKind, Result};
use crate::layout;
use crate::manifest::{Manifest, ObjectEntry};
use crate::pipeline::{self, CHANNEL_BOUND, DecodeError, Digests, EncodeOptions, ObjectWriter};
use crate::progress::{self, CountingReader, CountingWriter};
use crate::repository::Repository;
use crate::storage::{PartStream, StoreError};

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
        move |senders| ObjectWriter::new(options, senders),
        produce,
    )
    .await
}

/// Like `store_object`, for a source that writes a zstd stream itself (compressed where it
/// runs): stored as it comes; decoded on the way for the raw digests, and into `inspect`.
pub async fn store_precompressed_object<T, F>(
    repositories: &[Repository],
    key: &str,
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
        move |senders| Ok(ObjectWriter::precompressed(senders, inspect)),
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
    // Each repository's outcome: stored (with the size it took), or why not. An upload the
    // producer abandoned is no fault of the repository.
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
    let (digests, value) = match produced {
        Ok(produced) => produced,
        // The source failed, or stopped because every repository had: the first
        // repository's own error is the cause in that case.
        Err(source_failure) => {
            let store_failure = outcomes.into_iter().find_map(|o| o.err().flatten());
            return Err(match source_failure.kind() {
                ErrorKind::Storage => store_failure.unwrap_or(source_failure),
                _ => source_failure,
            });
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

/// "jobs/db/backups/ID/app.dump.zst" → "db/ID/app.dump.zst", for progress lines.
fn object_label(key: &str) -> String {
    key.strip_prefix("jobs/")
        .unwrap_or(key)
        .replacen("/backups/", "/", 1)
}

/// Streams one object of `manifest` from `repository` through the decode pipeline into
/// `consume` (on a blocking thread). Returns Ok only when both checksums match.
pub async fn read_object<T, F>(
    repository: &Repository,
    manifest: &Manifest,
    object: &ObjectEntry,
    consume: F,
) -> Result<T>
where
    T: Send + 'static,
    F: FnOnce(&mut dyn Read) -> io::Result<T> + Send + 'static,
{
    let key = layout::object_key(&manifest.job, &manifest.id, &object.name);
    let stream = repository
        .open_object(&manifest.job, &manifest.id, &object.name)
        .await?;
    let reader = SyncIoBridge::new(StreamReader::new(stream.map_err(io::Error::other)));
    let expected = object.digests();
    let label = format!("restore {}", object.name);
    let outcome = tokio::task::spawn_blocking(move || {
        let mut task = progress::start(&label, Some(expected.raw_size));
        let outcome = pipeline::decode(reader, &expected, |raw| {
            consume(&mut CountingReader {
                inner: raw,
                task: task.as_mut(),
            })
        });
        task.finish();
        outcome
    })
    .await
    .map_err(|e| {
        Error::new(ErrorKind::Storage, format!("unable to read object '{key}'")).with_source(e)
    })?;
    outcome.map_err(|e| {
        decode_failure(
            format!("object '{key}' in repository '{}'", repository.name),
            &manifest.job,
            e,
        )
    })
}

/// Downloads one object of `manifest` as it is stored (compressed) into the file `path`,
/// checking its stored size and sha256. For restores that stage before they decode.
pub async fn download_object(
    repository: &Repository,
    manifest: &Manifest,
    object: &ObjectEntry,
    path: &Path,
) -> Result<()> {
    let key = layout::object_key(&manifest.job, &manifest.id, &object.name);
    let file = std::fs::File::create(path).map_err(|e| {
        Error::new(
            ErrorKind::Target,
            format!("unable to create staging file '{}'", path.display()),
        )
        .with_source(e)
    })?;
    let stream = repository
        .open_object(&manifest.job, &manifest.id, &object.name)
        .await?;
    let reader = SyncIoBridge::new(StreamReader::new(stream.map_err(io::Error::other)));
    let expected = object.digests();
    let label = format!("download {}", object.name);
    let outcome = tokio::task::spawn_blocking(move || {
        let mut task = progress::start(&label, Some(expected.size));
        let mut out = io::BufWriter::with_capacity(pipeline::CHUNK_SIZE, file);
        let outcome = pipeline::copy_stored(
            reader,
            &expected,
            &mut CountingWriter {
                inner: &mut out,
                task: task.as_mut(),
            },
        );
        task.finish();
        outcome
    })
    .await
    .map_err(|e| {
        Error::new(ErrorKind::Storage, format!("unable to read object '{key}'")).with_source(e)
    })?;
    outcome.map(|_| ()).map_err(|e| {
        decode_failure(
            format!("object '{key}' in repository '{}'", repository.name),
            &manifest.job,
            e,
        )
    })
}

/// Decodes an object that `download_object` staged at `staged` from `repository` into
/// `consume`, on the calling thread. Returns Ok only when both checksums match.
pub fn decode_staged<T>(
    staged: &Path,
    repository: &Repository,
    manifest: &Manifest,
    object: &ObjectEntry,
    consume: impl FnOnce(&mut dyn Read) -> io::Result<T>,
) -> Result<T> {
    let key = layout::object_key(&manifest.job, &manifest.id, &object.name);
    let place = format!("object '{key}' from repository '{}'", repository.name);
    let file = std::fs::File::open(staged).map_err(|e| {
        Error::new(
            ErrorKind::Target,
            format!(
                "unable to open the staged copy '{}' of {place}",
                staged.display()
            ),
        )
        .with_source(e)
    })?;
    let expected = object.digests();
    let mut task = progress::start(&format!("restore {}", object.name), Some(expected.raw_size));
    let outcome = pipeline::decode(file, &expected, |raw| {
        consume(&mut CountingReader {
            inner: raw,
            task: task.as_mut(),
        })
    });
    task.finish();
    outcome.map_err(|e| decode_failure(place, &manifest.job, e))
}

/// Words a decode failure of the object at `place`.
fn decode_failure(place: String, job: &str, e: DecodeError) -> Error {
    match e {
        DecodeError::Download(cause) => {
            Error::new(ErrorKind::Storage, format!("unable to download {place}")).with_source(cause)
        }
        DecodeError::StoredMismatch(detail) | DecodeError::RawMismatch(detail) => {
            Error::new(ErrorKind::Verification, format!("damaged {place}: {detail}")).with_hint(format!(
                "the copy in another repository may be intact: try `--from` another repository, then `lifeboat verify {job}`"
            ))
        }
        DecodeError::Consumer(cause) => {
            Error::new(ErrorKind::Target, format!("unable to unpack {place}")).with_source(cause)
        }
    }
}
