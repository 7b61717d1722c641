//! `lifeboat verify --sample P% [JOB]`: a rotating scrub. Each stored object of a job in a
//! repository (every committed backup's manifest and objects, and its WAL files) belongs to
//! one of `100 / P` slices by a hash of its key, so the slices do not move when objects come
//! and go; each run reads the next slice in every repository and checks it as `verify` and
//! `verify --archive` do. Every object is read once per cycle of `100 / P` runs; the cycle's
//! position and when each slice was last proven intact live in the repository itself
//! (`jobs/JOB/sample.json`), so any host's run continues where the last one stopped.

use std::fmt;
use std::sync::Arc;

use bytes::Bytes;
use chrono::{DateTime, Duration, Utc};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::archive::{Checked, Failure, check_file};
use crate::config::{Config, JobConfig};
use crate::error::{Error, ErrorKind, Result};
use crate::inventory;
use crate::keys::{Identity, Keyring};
use crate::layout;
use crate::manifest::Manifest;
use crate::repository::Repository;
use crate::storage;
use crate::window::{self, ListedFile};

/// The span over which the report counts what was proven.
const PROVEN_SPAN_DAYS: i64 = 30;
const STATE_LIMIT: u64 = 1 << 20;

pub struct SampleOptions {
    pub job: Option<String>,
    pub from: Option<String>,
    /// The share of each repository read per run, in percent (1 to 100).
    pub percent: u32,
    pub deep: bool,
}

/// Parses "10%" or "10".
pub fn parse_percent(text: &str) -> std::result::Result<u32, String> {
    let number = text.trim().strip_suffix('%').unwrap_or(text.trim());
    match number.parse::<u32>() {
        Ok(percent) if (1..=100).contains(&percent) => Ok(percent),
        _ => Err(format!(
            "'{text}' is not a share to read per run: give a whole percentage from 1% to 100%"
        )),
    }
}

/// How many runs make a cycle: each reads one slice, at least `percent` of the objects.
pub fn slices_for(percent: u32) -> u32 {
    (100 / percent.clamp(1, 100)).max(1)
}

/// The slice `key` belongs to among `slices`: the same on every host and in every run.
pub fn slice_of(key: &str, slices: u32) -> u32 {
    let digest = Sha256::digest(key.as_bytes());
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    (u64::from_be_bytes(first) % u64::from(slices)) as u32
}

/// Where the rotation stands in one repository, for one job.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct SampleState {
    format: u32,
    job: String,
    slices: u32,
    next: u32,
    /// When each slice was last read with every object intact.
    proven_at: Vec<Option<DateTime<Utc>>>,
}

/// One run's slice of one job in one repository.
#[derive(Debug, Serialize)]
pub struct SampleCheck {
    pub job: String,
    pub repository: String,
    pub slices: u32,
    /// The slice read, from 0.
    pub slice: u32,
    /// Objects of the job the repository holds.
    pub objects: usize,
    /// The keys read by this run.
    pub read: Vec<String>,
    pub bytes_read: u64,
    pub damaged: Vec<(String, String)>,
    pub unreadable: Vec<(String, String)>,
    /// Encrypted objects checked by their stored checksum (or WAL note) only: no identity.
    pub stored_only: usize,
    /// The share of the objects held now (0 to 1) whose slice was read intact in the last
    /// 30 days.
    pub proven_share: f64,
    pub warnings: Vec<String>,
}

#[derive(Debug, Serialize)]
pub struct SampleReport {
    pub percent: u32,
    pub checks: Vec<SampleCheck>,
    pub unreachable: Vec<(String, String)>,
}

impl SampleReport {
    pub fn outcome(&self) -> Result<()> {
        let damaged: usize = self.checks.iter().map(|c| c.damaged.len()).sum();
        if damaged > 0 {
            return Err(Error::new(
                ErrorKind::Verification,
                format!("{damaged} damaged object(s) in the sample (the DAMAGED lines name them)"),
            )
            .with_hint("`lifeboat replicate --verify JOB` replaces damaged backup objects from an intact copy; a damaged WAL file is removed, then `lifeboat replicate JOB` copies it back"));
        }
        let unreadable: usize = self.checks.iter().map(|c| c.unreadable.len()).sum();
        if unreadable > 0 || !self.unreachable.is_empty() {
            let mut error = Error::new(
                ErrorKind::Storage,
                format!(
                    "{unreadable} object(s) could not be read and {} repository(ies) could not be listed, so they were not checked",
                    self.unreachable.len()
                ),
            );
            for (name, reason) in &self.unreachable {
                error = error.with_hint(format!("repository '{name}': {reason}"));
            }
            return Err(error);
        }
        Ok(())
    }
}

pub async fn run(config: &Config, options: &SampleOptions) -> Result<SampleReport> {
    let jobs: Vec<&JobConfig> = match &options.job {
        Some(name) => vec![config.job(name)?],
        None => config.jobs.iter().collect(),
    };
    let repositories = match &options.from {
        Some(_) => vec![Repository::choose(config, options.from.as_deref()).await?],
        None => Repository::open_all(config).await,
    };
    let keyring = config.keyring();
    let decrypt = options.deep || keyring.has_identity();
    let identities = match decrypt {
        true => Some(keyring.identities("the sampled objects")?),
        false => None,
    };
    let now = crate::clock::read(&repositories).await.clock().now();
    let slices = slices_for(options.percent);
    let mut report = SampleReport {
        percent: options.percent,
        checks: Vec::new(),
        unreachable: Vec::new(),
    };
    for job in jobs {
        for repository in &repositories {
            let reader = Reader {
                repository,
                job: &job.name,
                keyring: decrypt.then_some(&keyring),
                identities: identities.clone(),
            };
            match sample_repository(&reader, slices, now).await {
                Ok(check) => report.checks.push(check),
                Err(e) if options.from.is_some() => return Err(e),
                Err(e) => report
                    .unreachable
                    .push((repository.name.clone(), e.chain().join(": "))),
            }
        }
    }
    Ok(report)
}

struct Reader<'a> {
    repository: &'a Repository,
    job: &'a str,
    keyring: Option<&'a Keyring>,
    identities: Option<Arc<Vec<Identity>>>,
}

/// An object of the job: a backup's manifest or object, or a WAL file.
enum Sampled {
    Manifest { id: String },
    Object { id: String, name: String },
    Wal(ListedFile),
}

async fn sample_repository(
    reader: &Reader<'_>,
    slices: u32,
    now: DateTime<Utc>,
) -> Result<SampleCheck> {
    let (repository, job) = (reader.repository, reader.job);
    if !repository.has_marker().await? {
        return Err(Error::new(
            ErrorKind::Verification,
            format!(
                "repository '{}' holds no marker ({}): it was wiped, or is not a lifeboat repository; nothing was sampled or written there",
                repository.name,
                layout::MARKER_KEY
            ),
        ));
    }
    let holdings = inventory::holdings(repository, job).await?;
    let mut objects: Vec<(String, Sampled)> = Vec::new();
    for (id, holding) in holdings.iter().filter(|(_, h)| h.manifest) {
        objects.push((
            layout::manifest_key(job, id),
            Sampled::Manifest { id: id.clone() },
        ));
        for name in holding.objects.keys() {
            objects.push((
                layout::object_key(job, id, name),
                Sampled::Object {
                    id: id.clone(),
                    name: name.clone(),
                },
            ));
        }
    }
    let segment_size = segment_size_of(repository, job, &holdings).await;
    let archive = window::list_archive(repository, job, segment_size).await?;
    for listed in archive.files {
        objects.push((listed.key.clone(), Sampled::Wal(listed)));
    }
    let mut warnings = Vec::new();
    let mut state = match read_state(repository, job).await {
        Ok(Some(state)) if state.slices == slices && state.proven_at.len() == slices as usize => {
            state
        }
        Ok(_) => SampleState::default(),
        Err(e) => {
            warnings.push(format!(
                "{}; the rotation starts again",
                e.chain().join(": ")
            ));
            SampleState::default()
        }
    };
    if state.slices != slices {
        state = SampleState {
            format: 1,
            job: job.to_string(),
            slices,
            next: 0,
            proven_at: vec![None; slices as usize],
        };
    }
    let slice = state.next % slices;
    let mut check = SampleCheck {
        job: job.to_string(),
        repository: repository.name.clone(),
        slices,
        slice,
        objects: objects.len(),
        read: Vec::new(),
        bytes_read: 0,
        damaged: Vec::new(),
        unreadable: Vec::new(),
        stored_only: 0,
        proven_share: 0.0,
        warnings,
    };
    let mut manifests: std::collections::BTreeMap<String, Option<Manifest>> = Default::default();
    for (key, object) in objects
        .iter()
        .filter(|(key, _)| slice_of(key, slices) == slice)
    {
        check.read.push(key.clone());
        let outcome = read_one(reader, object, &mut manifests, segment_size).await;
        match outcome {
            Ok((bytes, stored_only)) => {
                check.bytes_read += bytes;
                check.stored_only += usize::from(stored_only);
            }
            Err(Failure::Damaged(why)) => check.damaged.push((key.clone(), why)),
            Err(Failure::Vanished) => check.warnings.push(format!(
                "'{key}' was removed after it was listed (a prune running at the same time); not checked"
            )),
            Err(Failure::Unreadable(why)) => check.unreadable.push((key.clone(), why)),
        }
    }
    // A slice found damaged is proven no longer; one that could not be read keeps what an
    // earlier run proved.
    if !check.damaged.is_empty() {
        state.proven_at[slice as usize] = None;
    } else if check.unreadable.is_empty() {
        state.proven_at[slice as usize] = Some(now);
    }
    state.next = (slice + 1) % slices;
    let since = now - Duration::days(PROVEN_SPAN_DAYS);
    let proven = objects
        .iter()
        .filter(|(key, _)| {
            state.proven_at[slice_of(key, slices) as usize]
                .is_some_and(|at| at >= since && at <= now)
        })
        .count();
    check.proven_share = match objects.len() {
        0 => 1.0,
        total => proven as f64 / total as f64,
    };
    if let Err(e) = write_state(repository, &state).await {
        check.warnings.push(format!(
            "the rotation could not be kept, so the next run reads this slice again: {}",
            e.chain().join(": ")
        ));
    }
    Ok(check)
}

/// The WAL segment size the job's backups record; 16 MiB when none does.
async fn segment_size_of(
    repository: &Repository,
    job: &str,
    holdings: &std::collections::BTreeMap<String, inventory::Holding>,
) -> u64 {
    for (id, _) in holdings.iter().rev().filter(|(_, h)| h.manifest) {
        if let Some(manifest) = inventory::own_manifest(repository, job, id).await {
            return manifest.source.wal_segment_size.unwrap_or(16 << 20);
        }
    }
    16 << 20
}

/// Reads and checks one object: its stored size, and whether only its stored checksum could
/// be checked.
async fn read_one(
    reader: &Reader<'_>,
    object: &Sampled,
    manifests: &mut std::collections::BTreeMap<String, Option<Manifest>>,
    segment_size: u64,
) -> std::result::Result<(u64, bool), Failure> {
    let (repository, job) = (reader.repository, reader.job);
    let judged = |e: Error| match e.kind() {
        ErrorKind::NotFound => Failure::Vanished,
        ErrorKind::Verification => Failure::Damaged(e.chain().join(": ")),
        _ => Failure::Unreadable(e.chain().join(": ")),
    };
    match object {
        Sampled::Wal(listed) => {
            let checked =
                check_file(repository, reader.identities.clone(), listed, segment_size).await?;
            Ok((listed.size, checked == Checked::NoteOnly))
        }
        Sampled::Manifest { id } => {
            let manifest = repository.read_manifest(job, id).await.map_err(judged)?;
            manifests.insert(id.clone(), Some(manifest));
            Ok((0, false))
        }
        Sampled::Object { id, name } => {
            if !manifests.contains_key(id) {
                match repository.read_manifest(job, id).await {
                    Ok(manifest) => manifests.insert(id.clone(), Some(manifest)),
                    // Not known damaged: the repository failed; the next run tries again.
                    Err(e)
                        if !matches!(e.kind(), ErrorKind::Verification | ErrorKind::NotFound) =>
                    {
                        return Err(Failure::Unreadable(e.chain().join(": ")));
                    }
                    Err(_) => manifests.insert(id.clone(), None),
                };
            }
            let Some(manifest) = manifests.get(id).and_then(Option::as_ref) else {
                return Err(Failure::Damaged(format!(
                    "backup {id} has no readable manifest in repository '{}' to check it against",
                    repository.name
                )));
            };
            let Some(entry) = manifest.objects.iter().find(|o| &o.name == name) else {
                // A leftover beside a backup (not in its manifest) is no part of it.
                return Ok((0, false));
            };
            let stored_only = entry.is_encrypted() && reader.keyring.is_none();
            match super::check_object(repository, manifest, entry, reader.keyring).await {
                Ok(None) => Ok((entry.size, stored_only)),
                Ok(Some(refused)) => Err(Failure::Damaged(format!(
                    "it matches its checksums but a restore refuses it: {refused}"
                ))),
                Err(e) if e.kind() == ErrorKind::Key => {
                    Err(Failure::Unreadable(e.chain().join(": ")))
                }
                Err(e) => Err(judged(e)),
            }
        }
    }
}

async fn read_state(repository: &Repository, job: &str) -> Result<Option<SampleState>> {
    let key = layout::sample_state_key(job);
    let bytes =
        match storage::get_range_bytes(repository.store.as_ref(), &key, Some(0..STATE_LIMIT)).await
        {
            Ok(bytes) => bytes,
            Err(e) if e.is_not_found() => return Ok(None),
            Err(e) => return Err(repository.error(&format!("read '{key}'"), e)),
        };
    let state: SampleState = serde_json::from_slice(&bytes).map_err(|e| {
        Error::new(
            ErrorKind::Verification,
            format!(
                "the sample rotation '{key}' in repository '{}' does not read: {e}",
                repository.name
            ),
        )
    })?;
    Ok((state.format == 1 && state.job == job).then_some(state))
}

async fn write_state(repository: &Repository, state: &SampleState) -> Result<()> {
    let key = layout::sample_state_key(&state.job);
    let body = Bytes::from(serde_json::to_vec_pretty(state).expect("the state serializes"));
    storage::put_bytes(repository.store.as_ref(), &key, body)
        .await
        .map(|_| ())
        .map_err(|e| repository.error(&format!("write '{key}'"), e))
}

impl fmt::Display for SampleReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for check in &self.checks {
            writeln!(
                f,
                "job '{}' in repository '{}': slice {} of {}: {} of {} object(s) read, {} damaged; {:.0}% proven in the last {PROVEN_SPAN_DAYS} days",
                check.job,
                check.repository,
                check.slice + 1,
                check.slices,
                check.read.len(),
                check.objects,
                check.damaged.len(),
                check.proven_share * 100.0
            )?;
            for (key, why) in &check.damaged {
                writeln!(f, "  DAMAGED  {key}: {why}")?;
            }
            for (key, why) in &check.unreadable {
                writeln!(f, "  UNREADABLE {key}: {why}")?;
            }
            for warning in &check.warnings {
                writeln!(f, "  warning: {warning}")?;
            }
            if check.stored_only > 0 {
                writeln!(
                    f,
                    "  note: {} encrypted object(s) checked by their stored checksum only: no identity file",
                    check.stored_only
                )?;
            }
        }
        for (name, reason) in &self.unreachable {
            writeln!(
                f,
                "warning: repository '{name}' could not be read: {reason}"
            )?;
        }
        let read: usize = self.checks.iter().map(|c| c.read.len()).sum();
        let damaged: usize = self.checks.iter().map(|c| c.damaged.len()).sum();
        writeln!(
            f,
            "sampled {}% of {} job archive(s): {read} object(s) read, {damaged} damaged",
            self.percent,
            self.checks.len()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_percentage_makes_a_cycle_that_reads_at_least_that_share_each_run() {
        assert_eq!(parse_percent("10%"), Ok(10));
        assert_eq!(parse_percent("25"), Ok(25));
        assert!(parse_percent("0%").is_err());
        assert!(parse_percent("101%").is_err());
        assert!(parse_percent("ten").is_err());
        assert_eq!(slices_for(10), 10);
        assert_eq!(slices_for(30), 3);
        assert_eq!(slices_for(100), 1);
        assert_eq!(slices_for(60), 1);
    }

    #[test]
    fn every_key_is_in_exactly_one_slice_and_stays_there() {
        let keys: Vec<String> = (0..500)
            .map(|n| format!("jobs/j/backups/x/{n}.zst"))
            .collect();
        let mut counts = [0usize; 10];
        for key in &keys {
            let slice = slice_of(key, 10);
            assert_eq!(slice, slice_of(key, 10));
            counts[slice as usize] += 1;
        }
        assert_eq!(counts.iter().sum::<usize>(), 500);
        // Spread: no slice empty or holding more than twice its share.
        assert!(counts.iter().all(|c| *c > 0 && *c < 100), "{counts:?}");
    }
}
