//! `lifeboat wal-push PATH` (PostgreSQL's `archive_command`) and `lifeboat wal-fetch NAME
//! DEST` (its `restore_command`). Both run once per 16 MiB segment, so they work in memory,
//! talk to every repository at once, and answer PostgreSQL in its own terms: wal-push
//! succeeds only once the file is durably stored in `min_repositories` (or already was,
//! byte for byte); wal-fetch exits 1 only when the archive truly lacks the file: a
//! repository that answers (its marker is there) and holds neither name.

use std::fmt;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde::Serialize;

use crate::config::{Config, JobConfig, JobSource, PostgresMode};
use crate::error::{Error, ErrorKind, Result};
use crate::keys::{self, Identity, Keyring};
use crate::layout;
use crate::pipeline::Tally;
use crate::repository::Repository;
use crate::storage::{self, StoreError};
use crate::wal::{self, ClusterRecord, WalFile, WalFileKind};

mod prefetch;
mod prepare;

pub use prefetch::{SPOOL_NAME, Spool, run_pass, source_key};

/// WAL keys listed and removed at a time.
pub const WAL_PAGE: usize = 10_000;

/// Whether `file` is archived encrypted: segments are, when `[encryption]` is configured.
/// Timeline and backup history files hold LSNs, times and the backup label, never data;
/// they stay readable with zstd alone, because the backup host, which holds public keys
/// only, reads them to finish a base backup.
pub fn encrypts(config: &Config, file: &WalFile) -> bool {
    config.encryption.is_some() && file.kind == WalFileKind::Segment
}

/// The physical job `name` names, or the only physical job when no name is given.
pub fn physical_job<'c>(config: &'c Config, name: Option<&str>) -> Result<&'c JobConfig> {
    let is_physical = |job: &JobConfig| matches!(&job.source, JobSource::Postgres(p) if p.mode == PostgresMode::Physical);
    if let Some(name) = name {
        let job = config.job(name)?;
        if !is_physical(job) {
            return Err(Error::usage(format!(
                "job '{name}' in '{}' is not a physical postgres job (it is {})",
                config.path.display(),
                job.kind_name()
            ))
            .with_hint("WAL archiving needs `kind = \"postgres\"` and `mode = \"physical\"`"));
        }
        return Ok(job);
    }
    let physical: Vec<&JobConfig> = config.jobs.iter().filter(|j| is_physical(j)).collect();
    match physical.as_slice() {
        [job] => Ok(job),
        [] => Err(Error::usage(format!(
            "no physical postgres job in '{}' to archive WAL for",
            config.path.display()
        ))
        .with_hint("add a job with `kind = \"postgres\"` and `mode = \"physical\"`")),
        several => Err(Error::usage(format!(
            "'{}' has {} physical postgres jobs; say which one with --job",
            config.path.display(),
            several.len()
        ))
        .with_hint(format!(
            "jobs: {}",
            several
                .iter()
                .map(|j| j.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ))),
    }
}

fn wal_file(name: &str) -> Result<WalFile> {
    WalFile::parse(name).ok_or_else(|| {
        Error::usage(format!("'{name}' is not the name of a WAL archive file"))
            .with_hint("expected a segment (24 hex digits), TTTTTTTT.history, SEGMENT.OFFSET.backup or SEGMENT.partial, as PostgreSQL passes in %f / %p")
    })
}

pub struct WalPushOptions {
    pub path: PathBuf,
    pub job: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct WalPushReport {
    pub job: String,
    pub file: String,
    pub raw_size: u64,
    pub stored_size: u64,
    /// Repositories that took the file now.
    pub stored: Vec<String>,
    /// Repositories that already held the same file (a retry by PostgreSQL).
    pub already_archived: Vec<String>,
    /// Repositories that lack it, with the cause: for `lifeboat replicate` to fill in.
    pub missing: Vec<(String, String)>,
    pub duration: Duration,
}

impl fmt::Display for WalPushReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "archived {}/{} ({} → {} bytes) in {} ms",
            self.job,
            self.file,
            self.raw_size,
            self.stored_size,
            self.duration.as_millis()
        )?;
        if !self.stored.is_empty() {
            write!(f, "; stored in {}", self.stored.join(", "))?;
        }
        if !self.already_archived.is_empty() {
            write!(f, "; already held by {}", self.already_archived.join(", "))?;
        }
        for (repository, cause) in &self.missing {
            write!(
                f,
                "\nwarning: repository '{repository}' lacks {}: {cause}\n  run `lifeboat replicate {}` once it can take it again",
                self.file, self.job
            )?;
        }
        Ok(())
    }
}

/// What one repository did with a pushed file.
enum Placed {
    Stored,
    AlreadyThere,
}

pub async fn push(config: &Config, options: &WalPushOptions) -> Result<WalPushReport> {
    let clock = Instant::now();
    let job = physical_job(config, options.job.as_deref())?;
    let name = options
        .path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let file = wal_file(&name)?;
    let level = config.compression.level;
    let recipients = match encrypts(config, &file) {
        true => config.recipients(),
        false => None,
    };
    let encrypted = recipients.is_some();
    let prepared = {
        let (path, file) = (options.path.clone(), file.clone());
        tokio::task::spawn_blocking(move || {
            prepare::prepare(&path, &file, level, recipients.as_ref())
        })
        .await
        .map_err(|e| Error::new(ErrorKind::Source, "the compressor stopped").with_source(e))?
    };
    let prepared = match prepared {
        Ok(prepared) => prepared,
        Err(prepare::Trouble::Read(e)) => {
            return Err(Error::new(
                ErrorKind::Source,
                format!(
                    "unable to read WAL file '{}' for job '{}'",
                    options.path.display(),
                    job.name
                ),
            )
            .with_source(e));
        }
        Err(prepare::Trouble::Refused(problem)) => {
            let refused = refusal(&file, &job.name, &problem);
            return Err(match file.kind {
                WalFileKind::Segment | WalFileKind::Partial => refused.with_hint(format!(
                    "PostgreSQL keeps the file and calls again; look at '{}' (a damaged disk, a file copied in by hand, a pg_wal of another cluster)",
                    options.path.display()
                )),
                WalFileKind::History | WalFileKind::BackupLabel => refused,
            });
        }
        Err(prepare::Trouble::Compress(e)) => {
            return Err(Error::new(
                ErrorKind::Source,
                format!("unable to compress WAL file '{name}'"),
            )
            .with_source(e));
        }
    };
    let prepare::Prepared {
        body,
        raw_size,
        raw_sha256,
        header,
    } = prepared;
    let key = layout::wal_key(&job.name, &file, encrypted);
    let all = Repository::open_all(config).await;
    let mut report = WalPushReport {
        job: job.name.clone(),
        file: file.name.clone(),
        raw_size,
        stored_size: body.len() as u64,
        stored: Vec::new(),
        already_archived: Vec::new(),
        missing: Vec::new(),
        duration: Duration::ZERO,
    };
    // A repository holding WAL holds its marker, so that wal-fetch can tell it lacks a file
    // from its not being there at all; one wiped while others are marked is not written.
    let mut marked = Vec::with_capacity(all.len());
    let prepared = crate::repository::prepare_markers(&all).await;
    for (repository, prepared) in all.iter().zip(prepared) {
        match prepared {
            Ok(()) => marked.push(repository.clone()),
            Err(e) => {
                tracing::warn!(repository = %repository.name, error = %e.chain().join(": "), "WAL file not archived here");
                report
                    .missing
                    .push((repository.name.clone(), e.chain().join(": ")));
            }
        }
    }
    let repositories = match &header {
        Some(header) => {
            same_cluster(&marked, &job.name, &file, header, &mut report.missing).await?
        }
        None => marked.iter().collect(),
    };
    // Timeline and backup history files steer a recovery: with a signing key they are
    // signed, so that a restore host that requires signatures takes no planted one.
    let signer = match signed_kind(&file) {
        true => config.signing.signer()?,
        false => None,
    };
    let outcomes = futures::future::join_all(repositories.iter().map(|repository| {
        place(
            repository,
            &key,
            &file,
            body.clone(),
            &raw_sha256,
            signer.as_ref(),
        )
    }))
    .await;

    let mut conflict = None;
    for (repository, outcome) in repositories.iter().zip(outcomes) {
        match outcome {
            Ok(Placed::Stored) => report.stored.push(repository.name.clone()),
            Ok(Placed::AlreadyThere) => report.already_archived.push(repository.name.clone()),
            Err(e) if e.kind() == ErrorKind::Verification => {
                conflict.get_or_insert(e);
            }
            Err(e) => {
                tracing::warn!(repository = %repository.name, error = %e.chain().join(": "), "WAL file not archived here");
                report
                    .missing
                    .push((repository.name.clone(), e.chain().join(": ")));
            }
        }
    }
    if let Some(conflict) = conflict {
        return Err(conflict);
    }
    let held = report.stored.len() + report.already_archived.len();
    if held < config.min_repositories {
        let mut error = Error::new(
            ErrorKind::Storage,
            format!(
                "unable to archive WAL file '{}' of job '{}': {held} of {} repositories hold it and min_repositories is {}",
                file.name,
                job.name,
                all.len(),
                config.min_repositories
            ),
        )
        .with_hint("PostgreSQL keeps the file and retries; WAL accumulates in pg_wal until the repositories are reachable");
        for (repository, cause) in &report.missing {
            error = error.with_hint(format!("repository '{repository}': {cause}"));
        }
        return Err(error);
    }
    report.duration = clock.elapsed();
    Ok(report)
}

fn refusal(file: &WalFile, job: &str, problem: &str) -> Error {
    Error::new(
        ErrorKind::Verification,
        format!(
            "refusing to archive WAL file '{}' of job '{job}': {problem}; nothing was stored",
            file.name
        ),
    )
}

/// The repositories a segment with `header` may go to: those whose record of the job's
/// cluster matches it, and those lacking a record, which learn it first (from a matching
/// record, else from this segment). When no record matches and one names another cluster,
/// the segment is refused everywhere: it is not this job's. A repository whose record names
/// another cluster while others match it, or cannot be read, goes to `missing` with the
/// cause: one planted or half-written record does not stop archiving into the rest.
async fn same_cluster<'r>(
    repositories: &'r [Repository],
    job: &str,
    file: &WalFile,
    header: &wal::SegmentHeader,
    missing: &mut Vec<(String, String)>,
) -> Result<Vec<&'r Repository>> {
    let records = futures::future::join_all(
        repositories
            .iter()
            .map(|repository| repository.cluster_record(job)),
    )
    .await;
    let key = layout::cluster_record_key(job);
    let mut matching = None;
    let mut learning = Vec::new();
    let mut usable = Vec::new();
    let mut other_cluster = Vec::new();
    for (repository, record) in repositories.iter().zip(records) {
        match record {
            Ok(Some(record)) => match record.mismatch(header) {
                Some(problem) => other_cluster.push((repository, problem)),
                None => {
                    matching.get_or_insert(record);
                    usable.push(repository);
                }
            },
            Ok(None) => learning.push(repository),
            Err(e) => missing.push((repository.name.clone(), e.chain().join(": "))),
        }
    }
    if matching.is_none()
        && let Some((repository, problem)) = other_cluster.first()
    {
        let mut refused = refusal(file, job, problem).with_hint(format!(
            "the record is '{key}' in repository '{}'",
            repository.name
        ));
        for (other, _) in &other_cluster[1..] {
            refused = refused.with_hint(format!("repository '{}' records the same", other.name));
        }
        return Err(refused.with_hint(
            "a cluster made by initdb or pg_upgrade, or restored from another job's backup, is a new cluster: archive it into a job of its own (a new `[[job]]` name in the config and in archive_command); the old job's backups and WAL stay restorable",
        ));
    }
    for (repository, problem) in other_cluster {
        missing.push((
            repository.name.clone(),
            format!(
                "its record '{key}' disagrees with another repository's: {problem}; remove it there if it is wrong, and the next push records this cluster"
            ),
        ));
    }
    let learned = matching.unwrap_or_else(|| ClusterRecord::from_segment(header, &file.name));
    let kept = futures::future::join_all(
        learning
            .iter()
            .map(|repository| repository.keep_cluster_record(job, &learned)),
    )
    .await;
    for (repository, kept) in learning.into_iter().zip(kept) {
        match kept.map(|record| record.mismatch(header)) {
            Ok(None) => usable.push(repository),
            // Another push recorded another cluster here at the same moment.
            Ok(Some(problem)) => missing.push((
                repository.name.clone(),
                format!("its record '{key}' was just made by another push: {problem}"),
            )),
            Err(e) => missing.push((repository.name.clone(), e.chain().join(": "))),
        }
    }
    // Config order, which the report follows.
    Ok(repositories
        .iter()
        .filter(|repository| usable.iter().any(|u| std::ptr::eq(*u, *repository)))
        .collect())
}

/// The raw sha256 of a stored WAL object: from its `WalNote` when it is encrypted (the
/// archiving host has no key to decrypt it), else by decoding its zstd frame.
pub(crate) fn raw_sha256_of_stored(stored: &[u8]) -> std::io::Result<String> {
    if keys::is_age(stored) {
        return keys::read_wal_note(stored)
            .map(|note| note.raw_sha256)
            .ok_or_else(|| {
                std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    "an encrypted WAL object without lifeboat's note of its raw sha256",
                )
            });
    }
    let mut tally = TallyWriter(Tally::default());
    zstd::stream::copy_decode(stored, &mut tally)?;
    Ok(tally.0.finish().1)
}

struct TallyWriter(Tally);

impl Write for TallyWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.update(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Stores `body` under `key` unless an object is there already; an object that is there
/// must hold the same raw bytes, else this is PostgreSQL's "different file, same name"
/// failure. The look first keeps a retry from uploading again, and the conditional create
/// keeps two pushers from replacing each other on servers that honour it.
async fn place(
    repository: &Repository,
    key: &str,
    file: &WalFile,
    body: Bytes,
    raw_sha256: &str,
    signer: Option<&crate::signing::Signer>,
) -> Result<Placed> {
    let store = repository.store.as_ref();
    let placed = match store.head(key).await {
        Ok(_) => same_as_archived(repository, key, file, raw_sha256).await?,
        Err(e) if e.is_not_found() => match store.create_if_absent(key, body).await {
            Ok(()) => Placed::Stored,
            Err(StoreError::AlreadyExists { .. }) => {
                same_as_archived(repository, key, file, raw_sha256).await?
            }
            Err(e) => return Err(repository.error(&format!("store '{key}'"), e)),
        },
        Err(e) => return Err(repository.error(&format!("look up '{key}'"), e)),
    };
    if let Some(signer) = signer {
        sign_archived(repository, key, signer).await?;
    }
    Ok(placed)
}

/// Whether files of this kind are signed (see `push`): history files, not segments.
fn signed_kind(file: &WalFile) -> bool {
    matches!(file.kind, WalFileKind::History | WalFileKind::BackupLabel)
}

/// Signs the object archived at `key` as it is stored (which may be an earlier push's
/// bytes), unless its signature by `signer` is already there.
async fn sign_archived(
    repository: &Repository,
    key: &str,
    signer: &crate::signing::Signer,
) -> Result<()> {
    let stored = storage::get_bytes(repository.store.as_ref(), key)
        .await
        .map_err(|e| repository.error(&format!("read the archived '{key}'"), e))?;
    let own = crate::signing::Trust::new(vec![
        crate::signing::parse_public_key(&signer.public_key()).expect("its own key parses"),
    ]);
    let present = repository.signature_of(key).await?;
    if own.check(&stored, present.as_deref(), key).is_ok() {
        return Ok(());
    }
    let signature = crate::signing::signature_key(key);
    let signed = signer.sign(&stored, key)?;
    storage::put_bytes(repository.store.as_ref(), &signature, Bytes::from(signed))
        .await
        .map(|_| ())
        .map_err(|e| repository.error(&format!("write signature '{signature}'"), e))
}

async fn same_as_archived(
    repository: &Repository,
    key: &str,
    file: &WalFile,
    raw_sha256: &str,
) -> Result<Placed> {
    let stored = storage::get_bytes(repository.store.as_ref(), key)
        .await
        .map_err(|e| repository.error(&format!("read the archived '{key}'"), e))?;
    let checked = file.clone();
    let archived = tokio::task::spawn_blocking(move || archived_copy(&stored, &checked))
        .await
        .map_err(|e| Error::new(ErrorKind::Storage, "the decompressor stopped").with_source(e))?;
    let different = || {
        format!(
            "unable to archive '{key}': repository '{}' already holds a different file under that name",
            repository.name
        )
    };
    match archived {
        Ok((archived, _)) if archived == raw_sha256 => Ok(Placed::AlreadyThere),
        // The file being pushed passed the same check before it got here.
        Ok((_, Some(Err(problem)))) => Err(Error::new(
            ErrorKind::Verification,
            format!(
                "{}, and that one can never be replayed: {problem}. The file being pushed is a valid segment",
                different()
            ),
        )
        .with_hint(format!(
            "remove '{key}' from repository '{}' (an older lifeboat stored it unchecked); PostgreSQL's next call archives the valid file",
            repository.name
        ))),
        Ok((_, Some(Ok(_)))) => Err(Error::new(
            ErrorKind::Verification,
            format!("{}; both are valid segments of this job's cluster", different()),
        )
        .with_hint("two servers of one cluster wrote the same segment differently: a restored copy promoted on the same timeline, or two primaries after a failover; give the second its own job")),
        Ok((_, None)) if file.kind == WalFileKind::Segment || file.kind == WalFileKind::Partial => Err(Error::new(
            ErrorKind::Verification,
            different(),
        )
        .with_hint("the archived copy is encrypted, so this host cannot say which of the two is valid; `lifeboat wal-fetch` with the identity file shows it")
        .with_hint("two clusters may be archiving into the same job, or this cluster was restored without a new timeline; give each cluster its own job")),
        Ok((_, None)) => Err(Error::new(
            ErrorKind::Verification,
            different(),
        )
        .with_hint("two clusters may be archiving into the same job, or this cluster was restored without a new timeline; give each cluster its own job")),
        Err(e) => Err(Error::new(
            ErrorKind::Verification,
            format!(
                "unable to archive '{key}': the copy repository '{}' holds under that name is damaged",
                repository.name
            ),
        )
        .with_source(e)
        .with_hint("remove the damaged object so the next push stores it again, after checking that the file being pushed is the right one")),
    }
}

/// The raw sha256 of an archived copy and, when this host can read it (not encrypted) and it
/// should be a segment, whether it is a valid one.
type ArchivedCopy = (
    String,
    Option<std::result::Result<wal::SegmentHeader, String>>,
);

fn archived_copy(stored: &[u8], file: &WalFile) -> std::io::Result<ArchivedCopy> {
    let is_segment = matches!(file.kind, WalFileKind::Segment | WalFileKind::Partial);
    if keys::is_age(stored) || !is_segment {
        return Ok((raw_sha256_of_stored(stored)?, None));
    }
    // An archived copy that decodes to more than the largest segment is no segment.
    let raw = wal::decode_limited(stored, 1 << 30)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
    let mut tally = Tally::default();
    tally.update(&raw);
    Ok((tally.finish().1, Some(wal::check_segment(file, &raw))))
}

pub struct WalFetchOptions {
    pub name: String,
    pub dest: WalDestination,
    pub source: WalSourceOptions,
}

/// Where `fetch` writes the file it found.
pub enum WalDestination {
    /// A path (PostgreSQL's %p): written beside it and renamed into place once whole and
    /// checked.
    Path(PathBuf),
    /// An open file, rewritten from its start: a relay's unnamed one, which has no path
    /// another user could swap and nothing to leave behind.
    File(std::fs::File),
    /// A path in a prefetch spool: like `Path`, but synced before it gets its name and its
    /// directory after, so that after a power loss the name holds the whole checked segment
    /// or nothing. A spooled segment is served long after it was checked, perhaps after a
    /// crash, and the call that serves it does not check it again.
    Spooled(PathBuf),
}

impl WalDestination {
    fn describe(&self) -> String {
        match self {
            WalDestination::Path(path) | WalDestination::Spooled(path) => {
                format!("'{}'", path.display())
            }
            WalDestination::File(_) => "the relay's unnamed file".to_string(),
        }
    }

    fn try_clone(&self) -> std::io::Result<WalDestination> {
        Ok(match self {
            WalDestination::Path(path) => WalDestination::Path(path.clone()),
            WalDestination::Spooled(path) => WalDestination::Spooled(path.clone()),
            WalDestination::File(file) => WalDestination::File(file.try_clone()?),
        })
    }
}

#[derive(Debug)]
pub enum WalFetchOutcome {
    Fetched {
        repository: String,
        size: u64,
        /// The repositories tried first that could not serve it, and why: a damaged or
        /// unreachable copy is no secret even when another one served.
        passed_over: Vec<String>,
    },
    /// Every repository that answered lacks the file: PostgreSQL's normal end of the archive.
    NotArchived,
}

/// Fetches `options.name` from the first repository (in config order) holding an intact
/// copy into `options.dest`, atomically. `NotArchived` when at least one repository said it
/// does not have the file and none had it; an error when no repository could tell.
pub async fn fetch(config: &Config, options: &WalFetchOptions) -> Result<WalFetchOutcome> {
    wal_file(&options.name)?;
    WalReader::open(config, &options.source)
        .await?
        .fetch(&options.name, &options.dest)
        .await
}

/// `wal-fetch` as PostgreSQL runs it: [`fetch`], with the job's prefetch (see [`prefetch`]).
/// A segment a pass fetched is handed over from the spool; once a segment is served, the
/// spool drops what recovery is past, and a pass starts for the segments after it.
pub async fn fetch_ahead(config: &Config, options: &WalFetchOptions) -> Result<WalFetchOutcome> {
    let file = wal_file(&options.name)?;
    let job = physical_job(config, options.source.job.as_deref())?;
    let depth = match &job.source {
        JobSource::Postgres(postgres) => postgres.wal_prefetch,
        _ => 0,
    };
    let dest = match &options.dest {
        WalDestination::Path(dest) if depth > 0 && file.kind == WalFileKind::Segment => {
            dest.clone()
        }
        _ => return fetch(config, options).await,
    };
    let source = &options.source;
    let spool = Spool::beside(&dest, prefetch::source_key(&config.path, source));
    let (waiting, name, into) = (spool.clone(), options.name.clone(), dest.clone());
    let spooled = tokio::task::spawn_blocking(move || waiting.take(&name, &into))
        .await
        .ok()
        .flatten();
    let outcome = match spooled {
        Some(size) => WalFetchOutcome::Fetched {
            repository: "prefetched".to_string(),
            size,
            passed_over: Vec::new(),
        },
        None => fetch(config, options).await?,
    };
    if let WalFetchOutcome::Fetched { size, .. } = &outcome {
        spool.prune(&file, *size, depth);
        let pass = spool.pass_after(&options.name, *size, depth);
        let started =
            std::env::current_exe().and_then(|exe| spool.start(&exe, &config.path, source, &pass));
        if let Err(e) = started {
            tracing::warn!(
                spool = %spool.dir().display(),
                "unable to start fetching WAL ahead: {e}; each segment is fetched when asked for"
            );
        }
    }
    Ok(outcome)
}

/// Where `wal-fetch` reads: its options but the file and its destination.
#[derive(Debug, Clone, Default)]
pub struct WalSourceOptions {
    /// The physical job (default: the only one).
    pub job: Option<String>,
    /// Read only from this repository.
    pub from: Option<String>,
    /// Never read from these repositories.
    pub exclude: Vec<String>,
    /// Decrypt with this identity file (the restore's), else as the config says.
    pub identity_file: Option<PathBuf>,
}

/// The repositories and keys WAL is fetched with, opened once for several files.
pub struct WalReader<'c> {
    config: &'c Config,
    pub job: &'c JobConfig,
    keyring: Keyring,
    repositories: Vec<Repository>,
}

impl<'c> WalReader<'c> {
    pub async fn open(config: &'c Config, source: &WalSourceOptions) -> Result<WalReader<'c>> {
        let job = physical_job(config, source.job.as_deref())?;
        let keyring = match &source.identity_file {
            Some(path) => Keyring::from_file(path.clone(), "--identity-file"),
            None => config.keyring(),
        };
        let repositories =
            Repository::readable(config, source.from.as_deref(), &source.exclude).await?;
        Ok(WalReader {
            config,
            job,
            keyring,
            repositories,
        })
    }

    /// Fetches `name` as [`fetch`] does.
    pub async fn fetch(&self, name: &str, dest: &WalDestination) -> Result<WalFetchOutcome> {
        let WalReader {
            config,
            job,
            keyring,
            repositories,
        } = self;
        let file = wal_file(name)?;
        let candidates = layout::wal_keys(&job.name, &file, encrypts(config, &file));
        let mut answered_missing = false;
        let mut failures = Vec::new();
        for repository in repositories {
            let (key, stored) = match find_wal(repository, &candidates).await {
                Ok(Some(found)) => found,
                // Lacking the file proves it was not archived only where the repository is
                // there to say so.
                Ok(None) => {
                    match repository.check_present().await {
                        Ok(()) => answered_missing = true,
                        Err(e) => failures.push(e),
                    }
                    continue;
                }
                Err(e) => {
                    failures.push(e);
                    continue;
                }
            };
            if signed_kind(&file) && repository.trust.required() {
                let signature = match repository.signature_of(&key).await {
                    Ok(signature) => signature,
                    Err(e) => {
                        failures.push(e);
                        continue;
                    }
                };
                if let Err(untrusted) = repository.trust.check(&stored, signature.as_deref(), &key)
                {
                    failures.push(Error::new(
                        ErrorKind::Verification,
                        format!(
                            "unable to trust '{key}' in repository '{}': {untrusted}",
                            repository.name
                        ),
                    ));
                    continue;
                }
            }
            let identities = match keys::is_age(&stored) {
                true => Some(keyring.identities(&format!(
                    "WAL file '{key}' in repository '{}'",
                    repository.name
                ))?),
                false => None,
            };
            let into = dest.try_clone().map_err(|e| {
                Error::new(
                    ErrorKind::Target,
                    format!("unable to write WAL file {}", dest.describe()),
                )
                .with_source(e)
            })?;
            let wanted = file.clone();
            let written = tokio::task::spawn_blocking(move || {
                write_decoded(
                    &stored,
                    identities.as_deref().map(Vec::as_slice),
                    &into,
                    &wanted,
                )
            })
            .await
            .map_err(|e| {
                Error::new(ErrorKind::Storage, "the decompressor stopped").with_source(e)
            })?;
            match written {
                Ok(size) => {
                    return Ok(WalFetchOutcome::Fetched {
                        repository: repository.name.clone(),
                        size,
                        passed_over: failures.iter().map(|e| e.chain().join(": ")).collect(),
                    });
                }
                Err(e) if e.get_ref().is_some_and(|inner| inner.is::<NoMatchingKey>()) => {
                    return Err(keyring.no_match(
                        &format!("WAL file '{key}' in repository '{}'", repository.name),
                        &[],
                    ));
                }
                Err(e) if e.kind() == std::io::ErrorKind::InvalidData => failures.push(
                    Error::new(
                        ErrorKind::Verification,
                        format!("damaged '{key}' in repository '{}'", repository.name),
                    )
                    .with_source(e),
                ),
                Err(e) => {
                    return Err(Error::new(
                        ErrorKind::Target,
                        format!("unable to write WAL file {}", dest.describe()),
                    )
                    .with_source(e));
                }
            }
        }
        if answered_missing && failures.iter().all(is_unreachable) {
            return Ok(WalFetchOutcome::NotArchived);
        }
        if failures.is_empty() {
            // No repository was asked (`--from` and `--exclude` left none): nothing said
            // the file is not archived, and taking it for the end of the archive would end
            // recovery where it stands.
            return Err(Error::usage(format!(
                "no repository of '{}' is left to read WAL file '{name}' from",
                config.path.display()
            ))
            .with_hint("check --from and --exclude in restore_command"));
        }
        let mut failures = failures.into_iter();
        let first = failures.next().expect("not empty");
        Err(failures.fold(first, |error, other| {
            error.with_hint(other.chain().join(": "))
        }))
    }
}

/// The first of `candidates` that `repository` holds, with its bytes; None when it holds
/// neither.
async fn find_wal(
    repository: &Repository,
    candidates: &[String],
) -> Result<Option<(String, Bytes)>> {
    for key in candidates {
        match storage::get_bytes(repository.store.as_ref(), key).await {
            Ok(stored) => return Ok(Some((key.clone(), stored))),
            Err(e) if e.is_not_found() => continue,
            Err(e) => return Err(repository.error(&format!("read '{key}'"), e)),
        }
    }
    Ok(None)
}

/// A repository that could not be read at all, as opposed to one holding a damaged copy.
fn is_unreachable(error: &Error) -> bool {
    error.kind() == ErrorKind::Storage
}

/// Decodes `stored` (decrypting it with `identities` when given) into `dest`. A path gets a
/// temp file beside it, checked, then renamed into place: PostgreSQL must never see a
/// partial segment under the real name. It is not synced: PostgreSQL replays it as soon as this returns and,
/// after a crash, fetches it from the archive again, so nothing needs it to outlive a power
/// loss, and syncing 16 MiB took longer than decoding it (pgBackRest's archive-get does not
/// sync either). A key that does not open it is [`NoMatchingKey`]; a copy that is no such file
/// is InvalidData; anything else failed writing it.
fn write_decoded(
    stored: &[u8],
    identities: Option<&[Identity]>,
    dest: &WalDestination,
    file: &WalFile,
) -> std::io::Result<u64> {
    match dest {
        WalDestination::Path(path) | WalDestination::Spooled(path) => {
            let parent = path
                .parent()
                .filter(|p| !p.as_os_str().is_empty())
                .unwrap_or(Path::new("."));
            let mut temp = tempfile::Builder::new()
                .prefix(prefetch::TEMP_PREFIX)
                .tempfile_in(parent)?;
            let _registered = crate::interrupt::RemovedOnInterrupt::new(temp.path());
            let size = decode_checked(stored, identities, temp.as_file_mut(), file)?;
            let spooled = matches!(dest, WalDestination::Spooled(_));
            if spooled {
                temp.as_file().sync_all()?;
            }
            temp.persist(path).map_err(|e| e.error)?;
            if spooled {
                std::fs::File::open(parent)?.sync_all()?;
            }
            Ok(size)
        }
        WalDestination::File(out) => {
            let mut out = out.try_clone()?;
            out.set_len(0)?;
            std::io::Seek::rewind(&mut out)?;
            decode_checked(stored, identities, &mut out, file)
        }
    }
}

/// No identity opens an encrypted WAL file.
#[derive(Debug)]
struct NoMatchingKey;

impl fmt::Display for NoMatchingKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("no matching key")
    }
}

impl std::error::Error for NoMatchingKey {}

/// A writer that keeps the error of a write that failed, apart from the reader's.
struct WriteFailure<'a, W> {
    inner: W,
    failed: &'a mut Option<std::io::Error>,
}

impl<W: Write> Write for WriteFailure<'_, W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.inner.write(buf).inspect_err(|e| {
            *self.failed = Some(std::io::Error::new(e.kind(), e.to_string()));
        })
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// Decodes `stored` into `out` (empty, at its start) and checks what it decoded to.
fn decode_checked(
    stored: &[u8],
    identities: Option<&[Identity]>,
    out: &mut std::fs::File,
    file: &WalFile,
) -> std::io::Result<u64> {
    // A hostile frame that expands without end stops at what a file of its kind holds,
    // before it fills the restore host's disk.
    let limit = match file.kind {
        WalFileKind::Segment | WalFileKind::Partial => 1 << 30,
        WalFileKind::History | WalFileKind::BackupLabel => crate::continuity::HISTORY_LIMIT,
    };
    // A write that fails (a full disk) is the target's fault, not the copy's: it is handed
    // on as it is, where a failure to decode says the copy is damaged.
    let mut write_failed = None;
    let mut copy_limited = |from: &mut dyn std::io::Read, out: &mut std::fs::File| {
        let decoder = zstd::stream::read::Decoder::new(from)?;
        let mut writer = WriteFailure {
            inner: out,
            failed: &mut write_failed,
        };
        let copied = std::io::copy(&mut std::io::Read::take(decoder, limit + 1), &mut writer)?;
        if copied > limit {
            return Err(std::io::Error::other(format!(
                "it decodes to more than {limit} bytes"
            )));
        }
        Ok(copied)
    };
    let decoded = match identities {
        None => copy_limited(&mut &stored[..], &mut *out).map(|_| ()),
        Some(identities) => match keys::open(stored, identities) {
            Ok(mut plain) => copy_limited(&mut plain, &mut *out).map(|_| ()),
            Err(keys::OpenError::NoMatchingKey) => {
                return Err(std::io::Error::other(NoMatchingKey));
            }
            Err(e) => Err(std::io::Error::other(e)),
        },
    };
    if let Some(write) = write_failed {
        return Err(write);
    }
    decoded.map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
    let size = out.metadata()?.len();
    // What PostgreSQL would take for the end of WAL must not reach it: a copy that is no
    // replayable segment is damaged, and the next repository's copy is tried.
    if file.kind == WalFileKind::Segment {
        if !wal::is_segment_size(size) {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("it decodes to {size} bytes, which is no WAL segment size"),
            ));
        }
        let mut decoded = Vec::with_capacity(size as usize);
        std::io::Seek::rewind(out)?;
        std::io::Read::read_to_end(out, &mut decoded)?;
        wal::check_segment(file, &decoded)
            .map_err(|problem| std::io::Error::new(std::io::ErrorKind::InvalidData, problem))?;
    }
    Ok(size)
}
