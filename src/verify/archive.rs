//! `lifeboat verify --archive [JOB]`: proves, per repository and per physical job, that the
//! WAL archive carries every kept base backup to the end of the archive: each gap (a run of
//! missing segments, a missing timeline history) is named with the recovery range it cuts,
//! and every file not yet proven is read and checked: a segment decodes to a replayable
//! segment of its name (an encrypted one is decrypted when an identity is at hand, else its
//! note of the raw sha256 is all that is checked), a history file reads as one and, with
//! `trusted_signers`, carries a trusted signature. What checked out is recorded in the
//! repository (see `window::ArchiveProof`), so that the next run reads only what is new;
//! `--full` reads everything again.

use std::fmt;
use std::sync::Arc;

use futures::StreamExt;
use serde::Serialize;

use crate::config::{Config, JobConfig};
use crate::error::{Error, ErrorKind, Result};
use crate::keys::{self, Identity};
use crate::pipeline::Tally;
use crate::repository::Repository;
use crate::storage;
use crate::wal::{self, WalFile, WalFileKind};
use crate::window::{self, ArchiveProof, ListedFile, Window};

/// Files read at once: a segment is held stored and decoded while it is checked.
const FILES_IN_FLIGHT: usize = 2;
/// The most a timeline history or backup label file decodes to.
const SMALL_FILE_LIMIT: u64 = 1 << 20;

pub struct ArchiveOptions {
    pub job: Option<String>,
    pub from: Option<String>,
    /// Decrypt encrypted segments too, failing when no identity is configured.
    pub deep: bool,
    /// Read every file again, not only those the last run did not prove.
    pub full: bool,
}

/// One physical job's archive in one repository.
#[derive(Debug, Serialize)]
pub struct ArchiveCheck {
    pub job: String,
    pub repository: String,
    pub files_listed: usize,
    /// Files read and checked by this run.
    pub files_read: usize,
    pub bytes_read: u64,
    /// Files the last runs proved and this one did not read again.
    pub proven_before: usize,
    /// Whether every file was read (`--full`, or no usable record of an earlier run).
    pub full: bool,
    /// Files whose copy here is damaged, and why.
    pub damaged: Vec<(String, String)>,
    /// Files that could not be read (the repository failed mid-way): not checked.
    pub unreadable: Vec<(String, String)>,
    /// Encrypted segments checked by their note of the raw sha256 only: no identity.
    pub stored_only: usize,
    /// Files removed between the listing and their reading (a prune at the same time): the
    /// window was judged with them, so this run proves nothing whole.
    pub vanished: usize,
    pub window: Window,
    /// The record of what was proven, when it could not be used or kept.
    pub warnings: Vec<String>,
}

impl ArchiveCheck {
    fn whole(&self) -> bool {
        self.window.backups > 0
            && self.window.gaps.is_empty()
            && self.window.problems.is_empty()
            && self.vanished == 0
            && self.damaged.is_empty()
            && self.unreadable.is_empty()
    }
}

#[derive(Debug, Serialize)]
pub struct ArchiveReport {
    pub checks: Vec<ArchiveCheck>,
    /// Repositories that could not be listed, by job, with the reason.
    pub unreachable: Vec<(String, String)>,
    /// Repositories without their marker while others hold theirs: not checked.
    pub not_whole: Vec<String>,
}

impl ArchiveReport {
    /// Ok when every archive read is continuous and intact; a gap or a damaged file fails
    /// (exit 1): some moment cannot be recovered from that repository alone.
    pub fn outcome(&self) -> Result<()> {
        if !self.not_whole.is_empty() {
            return Err(super::not_whole(&self.not_whole));
        }
        let gaps: usize = self.checks.iter().map(|c| c.window.gaps.len()).sum();
        let damaged: usize = self.checks.iter().map(|c| c.damaged.len()).sum();
        if gaps > 0 || damaged > 0 {
            let mut error = Error::new(
                ErrorKind::Verification,
                format!(
                    "the WAL archive is not whole: {gaps} gap(s) and {damaged} damaged file(s)"
                ),
            );
            for check in &self.checks {
                for gap in &check.window.gaps {
                    error = error.with_hint(format!(
                        "job '{}': {}",
                        check.job,
                        gap.describe(&check.repository)
                    ));
                }
            }
            if gaps > 0 {
                error = error.with_hint("`lifeboat replicate JOB` copies what a repository lacks from one that holds it; a new base backup (`lifeboat backup JOB`) starts a window past a gap no repository can fill (runbooks/archive-gap.md)");
            }
            if damaged > 0 {
                error = error.with_hint("remove the damaged copy the DAMAGED line names from its repository, then `lifeboat replicate JOB` copies it from a repository whose copy checks out (`lifeboat verify --archive --from NAME` says which do)");
            }
            return Err(error);
        }
        let problems: usize = self.checks.iter().map(|c| c.window.problems.len()).sum();
        if problems > 0 {
            return Err(Error::new(
                ErrorKind::Verification,
                format!(
                    "{problems} part(s) of the window could not be judged (the problem lines say which)"
                ),
            ));
        }
        let unreadable: usize = self.checks.iter().map(|c| c.unreadable.len()).sum();
        if unreadable > 0 || !self.unreachable.is_empty() {
            let mut error = Error::new(
                ErrorKind::Storage,
                format!(
                    "{unreadable} WAL file(s) could not be read and {} repository(ies) could not be listed, so they were not checked",
                    self.unreachable.len()
                ),
            );
            for (name, reason) in &self.unreachable {
                error = error.with_hint(format!("repository '{name}': {reason}"));
            }
            return Err(error
                .with_hint("run `lifeboat verify --archive` again when the repositories answer"));
        }
        Ok(())
    }
}

fn is_physical(job: &JobConfig) -> bool {
    job.backup_kind() == crate::layout::BackupKind::PostgresPhysical
}

pub async fn run(config: &Config, options: &ArchiveOptions) -> Result<ArchiveReport> {
    let jobs: Vec<&JobConfig> = match &options.job {
        Some(name) => {
            let job = config.job(name)?;
            if !is_physical(job) {
                return Err(Error::usage(format!(
                    "job '{name}' is not a physical postgres job, so it has no WAL archive to verify"
                ))
                .with_hint(format!("`lifeboat verify {name}` re-reads its backups")));
            }
            vec![job]
        }
        None => config.jobs.iter().filter(|job| is_physical(job)).collect(),
    };
    if jobs.is_empty() {
        return Err(Error::usage(format!(
            "'{}' has no physical postgres job, so there is no WAL archive to verify",
            config.path.display()
        )));
    }
    let repositories = match &options.from {
        Some(_) => vec![Repository::choose(config, options.from.as_deref()).await?],
        None => Repository::open_all(config).await,
    };
    let keyring = config.keyring();
    let identities = match options.deep || keyring.has_identity() {
        true => Some(keyring.identities("the WAL archive")?),
        false => None,
    };
    let signer = config.signing.signer();
    let now = crate::clock::read(&repositories).await.clock().now();
    let mut report = ArchiveReport {
        checks: Vec::new(),
        unreachable: Vec::new(),
        not_whole: Vec::new(),
    };
    // A repository without its marker (wiped, or a mount point with nothing mounted) is
    // judged not whole and written nothing, even when none of the others has one either.
    let mut wiped = Vec::new();
    for repository in &repositories {
        match repository.has_marker().await {
            Ok(true) => {}
            Ok(false) => {
                wiped.push(repository.name.clone());
                report.not_whole.push(format!(
                    "repository '{}' holds no marker ({}): it was wiped, or is not a lifeboat repository",
                    repository.name,
                    crate::layout::MARKER_KEY
                ));
            }
            Err(e) => {
                wiped.push(repository.name.clone());
                report
                    .unreachable
                    .push((repository.name.clone(), e.chain().join(": ")));
            }
        }
    }
    for job in jobs {
        let first_check = report.checks.len();
        for repository in repositories.iter().filter(|r| !wiped.contains(&r.name)) {
            let context = Context {
                job: &job.name,
                repository,
                identities: identities.clone(),
                full: options.full,
                now,
            };
            match check_repository(&context).await {
                Ok((mut check, proof)) => {
                    keep_proof(&context, &mut check, &proof, &signer).await;
                    report.checks.push(check);
                }
                Err(e) if options.from.is_some() => return Err(e),
                Err(e) => report
                    .unreachable
                    .push((repository.name.clone(), e.chain().join(": "))),
            }
        }
        judge_against_each_other(&mut report.checks[first_check..]);
    }
    Ok(report)
}

/// One repository holding nothing restorable of a job while another holds backups is no
/// smaller version of it.
fn judge_against_each_other(checks: &mut [ArchiveCheck]) {
    let Some((holder, held)) = checks
        .iter()
        .find(|c| c.window.backups > 0)
        .map(|c| (c.repository.clone(), c.window.backups))
    else {
        for check in checks.iter_mut() {
            check.window.problems.push(format!(
                "no repository holds a complete base backup of job '{}': nothing is restorable, so there is no window to prove",
                check.job
            ));
        }
        return;
    };
    for check in checks.iter_mut().filter(|c| c.window.backups == 0) {
        check.window.problems.push(format!(
            "it holds no complete backup of job '{}' while '{holder}' holds {held}",
            check.job
        ));
    }
}

struct Context<'a> {
    job: &'a str,
    repository: &'a Repository,
    identities: Option<Arc<Vec<Identity>>>,
    full: bool,
    now: chrono::DateTime<chrono::Utc>,
}

/// The window of one repository, and every file in it the last runs did not prove, read.
async fn check_repository(context: &Context<'_>) -> Result<(ArchiveCheck, ArchiveProof)> {
    let (window, archive) = window::of_repository(
        context.repository,
        context.job,
        crate::layout::BackupKind::PostgresPhysical,
    )
    .await?;
    let archive = archive.expect("a physical job's window lists its archive");
    let mut check = ArchiveCheck {
        job: context.job.to_string(),
        repository: context.repository.name.clone(),
        files_listed: archive.files.len(),
        files_read: 0,
        bytes_read: 0,
        proven_before: 0,
        full: true,
        damaged: Vec::new(),
        unreadable: Vec::new(),
        stored_only: 0,
        vanished: 0,
        window,
        warnings: Vec::new(),
    };
    let previous = match window::read_proof(context.repository, context.job).await {
        Ok(proof) => proof.filter(|p| p.segment_size == archive.segment_size),
        Err(e) => {
            check.warnings.push(format!(
                "{}; every file is read again",
                e.chain().join(": ")
            ));
            None
        }
    };
    // With a key at hand, a file proven by its note alone is read again, to be decrypted.
    let content = context.identities.is_some();
    let (held, to_read): (Vec<&ListedFile>, Vec<&ListedFile>) = match (&previous, context.full) {
        (Some(proof), false) => archive.files.iter().partition(|f| proof.holds(f, content)),
        _ => (Vec::new(), archive.files.iter().collect()),
    };
    let mut proven: Vec<(&ListedFile, bool)> = held
        .into_iter()
        .map(|listed| {
            let checked = previous.as_ref().is_some_and(|p| p.holds(listed, true));
            (listed, checked)
        })
        .collect();
    check.full = to_read.len() == archive.files.len();
    check.proven_before = proven.len();
    let segment_size = archive.segment_size;
    let mut damaged_files: Vec<&ListedFile> = Vec::new();
    let mut gone: Vec<String> = Vec::new();
    let results: Vec<(&ListedFile, std::result::Result<Checked, Failure>)> =
        futures::stream::iter(to_read)
            .map(|listed| async move {
                let identities = context.identities.clone();
                let checked =
                    check_file(context.repository, identities, listed, segment_size).await;
                (listed, checked)
            })
            .buffered(FILES_IN_FLIGHT)
            .collect()
            .await;
    for (listed, result) in results {
        match result {
            Ok(checked) => {
                check.files_read += 1;
                check.bytes_read += listed.size;
                check.stored_only += usize::from(checked == Checked::NoteOnly);
                proven.push((listed, checked == Checked::Whole));
            }
            Err(Failure::Damaged(why)) => {
                check.files_read += 1;
                check.bytes_read += listed.size;
                check.damaged.push((listed.key.clone(), why));
                damaged_files.push(listed);
                gone.push(listed.key.clone());
            }
            Err(Failure::Vanished) => {
                check.vanished += 1;
                gone.push(listed.key.clone());
                check.warnings.push(format!(
                    "'{}' was removed after it was listed (a prune running at the same time); not checked, and the window is judged again by the next run",
                    listed.key
                ));
            }
            Err(Failure::Unreadable(why)) => check.unreadable.push((listed.key.clone(), why)),
        }
    }
    // Recovery stops at a damaged copy as at a missing one, and a file gone since the listing
    // may leave a gap: the window is judged again without them.
    if !gone.is_empty() {
        let (window, _) = window::of_repository_without(
            context.repository,
            context.job,
            crate::layout::BackupKind::PostgresPhysical,
            &gone,
        )
        .await?;
        check.window = window;
    }
    if check.window.backups == 0 && check.files_listed > 0 {
        check.window.problems.push(
            "WAL is archived here but no complete base backup it would replay from".to_string(),
        );
    }
    let mut proof =
        ArchiveProof::of(context.job, segment_size, &proven).with_damaged(&damaged_files);
    proof.checked_at = Some(context.now);
    proof.full_at = match check.full {
        true => Some(context.now),
        false => previous.as_ref().and_then(|p| p.full_at),
    };
    proof.verified_at = match check.whole() {
        true => Some(context.now),
        false => previous.as_ref().and_then(|p| p.verified_at),
    };
    check.window.verified_at = proof.verified_at;
    Ok((check, proof))
}

/// Keeps what this run proved in the repository; one that cannot take it is a warning,
/// because the archive itself is what it is.
async fn keep_proof(
    context: &Context<'_>,
    check: &mut ArchiveCheck,
    proof: &ArchiveProof,
    signer: &Result<Option<crate::signing::Signer>>,
) {
    let signer = match signer {
        Ok(signer) => signer.as_ref(),
        Err(e) => {
            check.warnings.push(format!(
                "the record of what was proven is kept unsigned: {}",
                e.chain().join(": ")
            ));
            None
        }
    };
    if signer.is_none() && context.repository.trust.required() {
        check.warnings.push(
            "this host holds no signing key, so the record of what was proven is not trusted (trusted_signers) and every run reads every file; run `verify --archive` where [signing] key_file is set".to_string(),
        );
    }
    if let Err(e) = window::write_proof(context.repository, proof, signer).await {
        check.warnings.push(format!(
            "the record of what was proven could not be kept, so the next run reads these files again: {}",
            e.chain().join(": ")
        ));
    }
}

#[derive(Debug, PartialEq, Eq)]
pub(super) enum Checked {
    Whole,
    /// An encrypted segment read without an identity: its note of the raw sha256 is there.
    NoteOnly,
}

pub(super) enum Failure {
    /// Removed since it was listed: nothing to judge.
    Vanished,
    Damaged(String),
    Unreadable(String),
}

/// Reads one archived file from `repository` and checks it, as far as this host can
/// (decrypting with `identities` when given).
pub(super) async fn check_file(
    repository: &Repository,
    identities: Option<Arc<Vec<Identity>>>,
    listed: &ListedFile,
    segment_size: u64,
) -> std::result::Result<Checked, Failure> {
    let limit = match listed.file.kind {
        WalFileKind::Segment | WalFileKind::Partial => segment_size,
        WalFileKind::History | WalFileKind::BackupLabel => SMALL_FILE_LIMIT,
    };
    // zstd and age add little: a stored file much larger than what it holds is not one.
    if listed.size > limit + limit / 8 + 4096 {
        return Err(Failure::Damaged(format!(
            "it is {} bytes stored, more than a file of its kind holds",
            listed.size
        )));
    }
    let stored = match storage::get_bytes(repository.store.as_ref(), &listed.key).await {
        Ok(stored) => stored,
        Err(e) if e.is_not_found() => return Err(Failure::Vanished),
        Err(e) => {
            return Err(Failure::Unreadable(
                repository
                    .error(&format!("read '{}'", listed.key), e)
                    .chain()
                    .join(": "),
            ));
        }
    };
    if matches!(
        listed.file.kind,
        WalFileKind::History | WalFileKind::BackupLabel
    ) && repository.trust.required()
    {
        let signature = repository
            .signature_of(&listed.key)
            .await
            .map_err(|e| Failure::Unreadable(e.chain().join(": ")))?;
        repository
            .trust
            .check(&stored, signature.as_deref(), &listed.key)
            .map_err(|untrusted| Failure::Damaged(format!("untrusted: {untrusted}")))?;
    }
    let file = listed.file.clone();
    tokio::task::spawn_blocking(move || check_stored(&stored, &file, identities.as_deref(), limit))
        .await
        .map_err(|e| Failure::Unreadable(format!("the check stopped: {e}")))?
        .map_err(Failure::Damaged)
}

/// What `stored` holds, checked: decoded (decrypted first when `identities` are given) to at
/// most `limit` bytes, and a segment, history or label of its name.
fn check_stored(
    stored: &[u8],
    file: &WalFile,
    identities: Option<&Vec<Identity>>,
    limit: u64,
) -> std::result::Result<Checked, String> {
    let encrypted = keys::is_age(stored);
    let note = encrypted.then(|| keys::read_wal_note(stored));
    let raw = match (encrypted, identities) {
        (false, _) => wal::decode_limited(stored, limit)?,
        (true, Some(identities)) => {
            let plain =
                keys::open(stored, identities).map_err(|e| format!("it does not decrypt: {e}"))?;
            wal::decode_limited(plain, limit)?
        }
        (true, None) => {
            return match note.flatten() {
                Some(_) => Ok(Checked::NoteOnly),
                None => {
                    Err("it is encrypted without lifeboat's note of its raw sha256".to_string())
                }
            };
        }
    };
    match file.kind {
        WalFileKind::Segment | WalFileKind::Partial => {
            wal::check_segment(file, &raw)?;
        }
        WalFileKind::History => {
            wal::check_history(file.timeline, &raw)?;
        }
        WalFileKind::BackupLabel => {}
    }
    if let Some(note) = note {
        let mut tally = Tally::default();
        tally.update(&raw);
        let (_, sha256) = tally.finish();
        match note {
            Some(note) if note.raw_sha256 == sha256 => {}
            Some(_) => {
                return Err(
                    "what it decrypts to does not match its note of the raw sha256".to_string(),
                );
            }
            None => {
                return Err("it is encrypted without lifeboat's note of its raw sha256".to_string());
            }
        }
    }
    Ok(Checked::Whole)
}

impl fmt::Display for ArchiveReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for check in &self.checks {
            let window = &check.window;
            writeln!(
                f,
                "job '{}' in repository '{}': {} WAL file(s), {} read ({} proven before{}), {} damaged",
                check.job,
                check.repository,
                check.files_listed,
                check.files_read,
                check.proven_before,
                if check.full { ", all read" } else { "" },
                check.damaged.len()
            )?;
            match (window.earliest, window.latest) {
                (Some(earliest), Some(latest)) => writeln!(
                    f,
                    "  restorable from {} to {} ({} complete backup(s))",
                    window::human_time(earliest),
                    window::human_time(latest),
                    window.backups
                )?,
                _ => writeln!(
                    f,
                    "  nothing restorable: no complete base backup whose WAL is whole"
                )?,
            }
            for gap in &window.gaps {
                writeln!(f, "  GAP      {}", gap.describe(&check.repository))?;
            }
            for (key, why) in &check.damaged {
                writeln!(f, "  DAMAGED  {key}: {why}")?;
            }
            for (key, why) in &check.unreadable {
                writeln!(f, "  UNREADABLE {key}: {why}")?;
            }
            for problem in &window.problems {
                writeln!(f, "  problem: {problem}")?;
            }
            for warning in &check.warnings {
                writeln!(f, "  warning: {warning}")?;
            }
            if check.stored_only > 0 {
                writeln!(
                    f,
                    "  note: {} encrypted segment(s) checked by their note of the raw sha256 only: no identity file; set {} (`--deep` insists on it)",
                    check.stored_only,
                    keys::IDENTITY_ENV
                )?;
            }
        }
        for (name, reason) in &self.unreachable {
            writeln!(
                f,
                "warning: repository '{name}' could not be read: {reason}"
            )?;
        }
        for problem in &self.not_whole {
            writeln!(f, "NOT WHOLE {problem}")?;
        }
        let gaps: usize = self.checks.iter().map(|c| c.window.gaps.len()).sum();
        let damaged: usize = self.checks.iter().map(|c| c.damaged.len()).sum();
        let read: usize = self.checks.iter().map(|c| c.files_read).sum();
        writeln!(
            f,
            "verified {} WAL archive(s): {gaps} gap(s), {damaged} damaged file(s), {read} file(s) read",
            self.checks.len()
        )
    }
}
