//! `lifeboat verify [JOB]`: re-reads every object of every committed backup (or one), checks
//! the stored and the decompressed checksum, and reports each damaged copy. With `--from`
//! it reads that repository alone; otherwise each object is read from the first repository
//! in config order that holds it, and a missing, unreadable or damaged copy moves on to the
//! next — so the report says both what is damaged where and whether an intact copy exists.
//! An encrypted object is decrypted too when an identity is at hand (`--deep` insists on
//! one); without one only its stored checksum is checked, and the report says so.

pub mod archive;
pub mod sample;

use std::fmt;

use serde::Serialize;
use tracing::Instrument;

use crate::config::Config;
use crate::error::{Error, ErrorKind, Result};
use crate::keys::Keyring;
use crate::manifest::{Manifest, ObjectEntry};
use crate::repository::Repository;
use crate::transfer::StoredObject;

pub struct VerifyOptions {
    pub job: Option<String>,
    pub backup: Option<String>,
    pub from: Option<String>,
    /// Decrypt encrypted objects too, failing when no identity is configured.
    pub deep: bool,
}

#[derive(Debug, Serialize)]
pub struct ObjectCheck {
    pub job: String,
    pub backup: String,
    /// The object's name, or "manifest.json" when the manifest itself is unreadable.
    pub object: String,
    /// The repository whose copy checked out, if any did.
    pub intact_in: Option<String>,
    /// Copies found missing or damaged on the way, by repository.
    pub damaged_in: Vec<(String, String)>,
    /// Copies that could not be read (the repository failed or timed out mid-way), by
    /// repository: not checked, so neither intact nor damaged.
    pub unreadable_in: Vec<(String, String)>,
    /// A tar object whose intact copy a restore would refuse: the first entry it refuses,
    /// and why. Every copy holds the same bytes, so none would do better.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub refused: Option<String>,
}

impl ObjectCheck {
    fn key(&self) -> String {
        format!("jobs/{}/backups/{}/{}", self.job, self.backup, self.object)
    }

    /// A copy that failed: damaged when what was read (or not found) is wrong, unreadable
    /// when the repository itself failed before the copy could be judged.
    fn record_failure(&mut self, repository: &str, e: &Error) {
        let entry = (repository.to_string(), e.chain().join(": "));
        match e.kind() {
            ErrorKind::Verification | ErrorKind::NotFound => self.damaged_in.push(entry),
            _ => self.unreadable_in.push(entry),
        }
    }
}

#[derive(Debug, Serialize)]
pub struct VerifyReport {
    /// The repositories read, in order.
    pub repositories: Vec<String>,
    pub backups: usize,
    pub checks: Vec<ObjectCheck>,
    /// Repositories that could not be listed, with the reason.
    pub unreachable: Vec<(String, String)>,
    /// Encrypted objects of which only the stored checksum was checked: no identity.
    pub stored_only: usize,
    /// Repositories read that are not whole: no marker while others hold theirs (wiped), or
    /// none of a job's backups while others hold some.
    pub not_whole: Vec<String>,
}

impl VerifyReport {
    /// Objects of which no intact copy was found.
    pub fn lost(&self) -> impl Iterator<Item = &ObjectCheck> {
        self.checks.iter().filter(|c| c.intact_in.is_none())
    }

    pub fn damaged_copies(&self) -> usize {
        self.checks.iter().map(|c| c.damaged_in.len()).sum()
    }

    pub fn unreadable_copies(&self) -> usize {
        self.checks.iter().map(|c| c.unreadable_in.len()).sum()
    }

    /// Intact objects a restore would refuse.
    pub fn refused(&self) -> impl Iterator<Item = &ObjectCheck> {
        self.checks.iter().filter(|c| c.refused.is_some())
    }

    /// Ok if every copy read is intact. An object with no intact copy is a failure; damaged
    /// copies with an intact one elsewhere, or a repository that could not be read, leave the
    /// backups restorable but degraded.
    pub fn outcome(&self) -> Result<()> {
        if !self.repositories.is_empty() && self.unreachable.len() == self.repositories.len() {
            let mut error = Error::new(
                ErrorKind::Storage,
                "no repository could be listed, so nothing was verified",
            );
            for (name, reason) in &self.unreachable {
                error = error.with_hint(format!("repository '{name}': {reason}"));
            }
            return Err(error);
        }
        if !self.not_whole.is_empty() {
            return Err(not_whole(&self.not_whole));
        }
        let lost = self.lost().count();
        let place = match self.repositories.as_slice() {
            [only] => format!("repository '{only}'"),
            _ => "any repository".to_string(),
        };
        // An object none of whose copies could be read is not known to be damaged: it is
        // unchecked, which is a failure of the run, not a finding about the backup.
        let unread = self.lost().filter(|c| c.damaged_in.is_empty()).count();
        let lost = lost - unread;
        if lost > 0 {
            return Err(Error::new(
                ErrorKind::Verification,
                format!("{lost} damaged object(s) in {place}"),
            )
            .with_hint("restore from another repository with `--from`, and take a new backup"));
        }
        let refused = self.refused().count();
        if refused > 0 {
            return Err(Error::new(
                ErrorKind::Verification,
                format!(
                    "{refused} object(s) match their checksums but hold an archive a restore refuses, so their backups cannot be restored"
                ),
            )
            .with_hint("the REFUSED lines name the entry; take a new backup, and restore from an older one meanwhile"));
        }
        if unread > 0 {
            return Err(Error::new(
                ErrorKind::Storage,
                format!("{unread} object(s) could not be read from {place}, so they were not checked"),
            )
            .with_hint("the repository failed mid-way (the UNREADABLE lines say how); run `lifeboat verify` again when it answers"));
        }
        let damaged = self.damaged_copies();
        let unreadable = self.unreadable_copies();
        if damaged == 0 && unreadable == 0 && self.unreachable.is_empty() {
            return Ok(());
        }
        let mut error = Error::new(
            ErrorKind::Degraded,
            format!(
                "{damaged} damaged copy(ies), {unreadable} unreadable copy(ies) and {} unreachable repository(ies); every object has an intact copy",
                self.unreachable.len()
            ),
        );
        for (name, reason) in &self.unreachable {
            error = error.with_hint(format!("repository '{name}': {reason}"));
        }
        if damaged > 0 {
            error =
                error.with_hint("run `lifeboat replicate --verify` to replace the damaged copies");
        }
        Err(error)
    }
}

/// The failure of a run that met repositories not whole (wiped, or holding none of what the
/// others hold): what it proved of the others says nothing of them.
fn not_whole(problems: &[String]) -> Error {
    Error::new(
        ErrorKind::Verification,
        format!(
            "{} repository(ies) do not hold what the others hold: {}",
            problems.len(),
            problems.join("; ")
        ),
    )
    .with_hint("`lifeboat replicate --reseed` copies every backup and the WAL into a wiped repository and writes its marker")
}

pub async fn run(config: &Config, options: &VerifyOptions) -> Result<VerifyReport> {
    let repositories = match &options.from {
        Some(_) => vec![Repository::choose(config, options.from.as_deref()).await?],
        None => Repository::open_all(config).await,
    };
    let jobs: Vec<String> = match &options.job {
        Some(name) => vec![config.job(name)?.name.clone()],
        None => config.jobs.iter().map(|j| j.name.clone()).collect(),
    };
    let mut report = VerifyReport {
        repositories: repositories.iter().map(|r| r.name.clone()).collect(),
        backups: 0,
        checks: Vec::new(),
        unreachable: Vec::new(),
        stored_only: 0,
        not_whole: Vec::new(),
    };
    // Each repository read is judged against all the config names: a wiped one is no
    // smaller version of the others, and verifying the nothing it holds proves nothing.
    let all = Repository::open_all(config).await;
    let markers = crate::repository::read_markers(&all).await;
    let mut unreadable_markers = Vec::new();
    for (index, repository) in all.iter().enumerate() {
        if !repositories.iter().any(|r| r.name == repository.name) {
            continue;
        }
        if let Some(wiped) = markers.wiped(&all, index) {
            report.not_whole.push(wiped.to_string());
        } else if let Err(e) = &markers.held[index] {
            unreadable_markers.push((repository.name.clone(), e.chain().join(": ")));
        }
    }
    let keyring = config.keyring();
    let decrypt = options.deep || keyring.has_identity();
    for job in &jobs {
        // Each repository's backup ids; one that cannot be listed is reported, not fatal,
        // unless it is the only one asked for.
        let mut listed: Vec<(&Repository, Vec<String>)> = Vec::new();
        for repository in &repositories {
            match repository.backup_ids(job).await {
                Ok(ids) => listed.push((repository, ids)),
                Err(e) if options.from.is_some() => return Err(e),
                Err(e) => {
                    if !report
                        .unreachable
                        .iter()
                        .any(|(n, _)| n == &repository.name)
                    {
                        report
                            .unreachable
                            .push((repository.name.clone(), e.chain().join(": ")));
                    }
                }
            }
        }
        if let Some((from, held)) = listed.first()
            && options.from.is_some()
            && held.is_empty()
        {
            for other in all.iter().filter(|r| r.name != from.name) {
                if let Ok(theirs) = other.backup_ids(job).await
                    && !theirs.is_empty()
                {
                    report.not_whole.push(format!(
                        "repository '{}' holds no backup of job '{job}' while '{}' holds {}",
                        from.name,
                        other.name,
                        theirs.len()
                    ));
                    break;
                }
            }
        }
        let ids = chosen_ids(
            &listed,
            options.backup.as_deref(),
            job,
            &report.repositories,
        )?;
        for id in ids {
            report.backups += 1;
            let sources: Vec<&Repository> = listed
                .iter()
                .filter(|(_, ids)| ids.contains(&id))
                .map(|(repository, _)| *repository)
                .collect();
            let first_check = report.checks.len();
            let span = tracing::info_span!("verify", job = %job, backup = %id);
            report.stored_only += verify_backup(
                job,
                &id,
                &sources,
                decrypt.then_some(&keyring),
                &mut report.checks,
            )
            .instrument(span)
            .await?;
            let checks = &report.checks[first_check..];
            if !checks.is_empty() && checks.iter().all(|c| c.intact_in.is_some()) {
                record_verified(job, &id, &sources).await;
            }
        }
    }
    // A marker that cannot be read where the repository could be listed: a location that
    // is not (or no longer) a lifeboat repository, or a broken one; not a whole copy.
    for (name, why) in unreadable_markers {
        if !report.unreachable.iter().any(|(n, _)| n == &name) {
            report.not_whole.push(format!("repository '{name}': {why}"));
        }
    }
    Ok(report)
}

/// The backups to verify, newest first: every id any repository listed, the newest, or
/// the one `wanted`.
fn chosen_ids(
    listed: &[(&Repository, Vec<String>)],
    wanted: Option<&str>,
    job: &str,
    repositories: &[String],
) -> Result<Vec<String>> {
    let mut ids: Vec<String> = listed.iter().flat_map(|(_, ids)| ids.clone()).collect();
    ids.sort_unstable_by(|a, b| b.cmp(a));
    ids.dedup();
    match wanted {
        None => Ok(ids),
        Some("latest") => Ok(ids.into_iter().take(1).collect()),
        Some(wanted) if ids.iter().any(|id| id == wanted) => Ok(vec![wanted.to_string()]),
        Some(wanted) => Err(Error::new(
            ErrorKind::NotFound,
            format!(
                "unable to find backup '{wanted}' of job '{job}' in {}",
                repositories.join(", ")
            ),
        )
        .with_hint(format!(
            "run `lifeboat list {job}` to see the backups each repository holds"
        ))),
    }
}

/// When a backup last checked out intact: `prune` never removes the newest such backup.
#[derive(Debug, Serialize, serde::Deserialize)]
pub struct VerifiedRecord {
    pub job: String,
    pub backup: String,
    pub verified_at: chrono::DateTime<chrono::Utc>,
}

/// Keeps the record in every repository read; one that cannot take it is only a warning,
/// because the backups themselves are fine.
async fn record_verified(job: &str, id: &str, repositories: &[&Repository]) {
    let record = VerifiedRecord {
        job: job.to_string(),
        backup: id.to_string(),
        verified_at: chrono::Utc::now(),
    };
    let body = bytes::Bytes::from(serde_json::to_vec_pretty(&record).expect("record serializes"));
    let key = crate::layout::verified_key(job, id);
    for repository in repositories {
        if let Err(e) =
            crate::storage::put_bytes(repository.store.as_ref(), &key, body.clone()).await
        {
            tracing::warn!(repository = %repository.name, key = %key, error = %e, "unable to record the verification");
        }
    }
}

/// Checks every object of one backup, each in the first source with an intact copy; returns
/// how many were checked by their stored checksum alone. A key that does not open an
/// object fails the whole run: no other copy would do better.
async fn verify_backup(
    job: &str,
    id: &str,
    sources: &[&Repository],
    keyring: Option<&Keyring>,
    checks: &mut Vec<ObjectCheck>,
) -> Result<usize> {
    let mut manifest_check = ObjectCheck {
        job: job.to_string(),
        backup: id.to_string(),
        object: crate::layout::MANIFEST_NAME.to_string(),
        intact_in: None,
        damaged_in: Vec::new(),
        unreadable_in: Vec::new(),
        refused: None,
    };
    let mut manifest = None;
    for repository in sources {
        match repository.read_manifest(job, id).await {
            Ok(found) => {
                manifest_check.intact_in = Some(repository.name.clone());
                manifest = Some(found);
                break;
            }
            Err(e) => manifest_check.record_failure(&repository.name, &e),
        }
    }
    let Some(manifest) = manifest else {
        checks.push(manifest_check);
        return Ok(0);
    };
    if !manifest_check.damaged_in.is_empty() || !manifest_check.unreadable_in.is_empty() {
        checks.push(manifest_check);
    }
    let mut stored_only = 0;
    for object in &manifest.objects {
        let mut check = ObjectCheck {
            job: job.to_string(),
            backup: id.to_string(),
            object: object.name.clone(),
            intact_in: None,
            damaged_in: Vec::new(),
            unreadable_in: Vec::new(),
            refused: None,
        };
        if object.is_encrypted() && keyring.is_none() {
            stored_only += 1;
        }
        for repository in sources {
            match check_object(repository, &manifest, object, keyring).await {
                Err(e) if e.kind() == ErrorKind::Key => return Err(e),
                Ok(refused) => {
                    check.intact_in = Some(repository.name.clone());
                    check.refused = refused;
                    break;
                }
                Err(e) => {
                    tracing::error!(job = %job, backup = %id, object = %object.name, repository = %repository.name, error = %e, "copy not intact");
                    check.record_failure(&repository.name, &e);
                }
            }
        }
        checks.push(check);
    }
    Ok(stored_only)
}

/// Both checksums of one copy; only the stored one for an encrypted object without keys.
/// A tar object read whole is checked entry by entry as a restore checks it too: the
/// refusal, when its checksums match, is returned.
pub(super) async fn check_object(
    repository: &Repository,
    manifest: &Manifest,
    object: &ObjectEntry,
    keyring: Option<&Keyring>,
) -> Result<Option<String>> {
    let stored = StoredObject {
        repository,
        manifest,
        object,
    };
    match keyring {
        None if object.is_encrypted() => stored.check_stored().await.map(|()| None),
        _ => {
            let keyring = keyring.cloned().unwrap_or_default();
            let tar = crate::layout::holds_tar(object.logical_name());
            stored
                .read(&keyring, move |raw| {
                    let checked = tar.then(|| crate::archive::check_archive(raw));
                    // The rest (the archive's padding, or all of it): the checksums cover it,
                    // and they decide before a refusal is believed.
                    std::io::copy(raw, &mut std::io::sink())?;
                    match checked {
                        Some(Err(e))
                            if matches!(
                                e.kind(),
                                std::io::ErrorKind::InvalidData | std::io::ErrorKind::UnexpectedEof
                            ) =>
                        {
                            Ok(Some(e.to_string()))
                        }
                        Some(Err(e)) => Err(e),
                        _ => Ok(None),
                    }
                })
                .await
        }
    }
}

impl fmt::Display for VerifyReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let several = self.repositories.len() > 1;
        for check in &self.checks {
            let key = check.key();
            for (label, copies) in [
                ("DAMAGED ", &check.damaged_in),
                ("UNREADABLE", &check.unreadable_in),
            ] {
                for (repository, problem) in copies {
                    match several {
                        true => writeln!(f, "{label} {key} in '{repository}': {problem}")?,
                        false => writeln!(f, "{label} {key}: {problem}")?,
                    }
                }
            }
            if let Some(why) = &check.refused {
                writeln!(f, "REFUSED  {key}: {why}")?;
                continue;
            }
            match (&check.intact_in, several) {
                (Some(repository), true) => writeln!(f, "ok       {key} in '{repository}'")?,
                (Some(_), false) => writeln!(f, "ok       {key}")?,
                (None, true) => writeln!(f, "LOST     {key}: no intact copy in any repository")?,
                (None, false) => {}
            }
        }
        for (name, reason) in &self.unreachable {
            writeln!(
                f,
                "warning: repository '{name}' could not be listed: {reason}"
            )?;
        }
        for problem in &self.not_whole {
            writeln!(f, "NOT WHOLE {problem}")?;
        }
        if self.stored_only > 0 {
            writeln!(
                f,
                "note: {} encrypted object(s) checked by their stored sha256 only: no identity file; set {} to decrypt them and check what they hold too (`--deep` insists on it)",
                self.stored_only,
                crate::keys::IDENTITY_ENV
            )?;
        }
        let objects = self.checks.len();
        let place = self
            .repositories
            .iter()
            .map(|r| format!("'{r}'"))
            .collect::<Vec<_>>()
            .join(", ");
        let noun = if several {
            "repositories"
        } else {
            "repository"
        };
        match several {
            false => writeln!(
                f,
                "verified {} backup(s), {objects} object(s) in {noun} {place}: {} damaged, {} unreadable",
                self.backups,
                self.damaged_copies(),
                self.unreadable_copies()
            ),
            true => writeln!(
                f,
                "verified {} backup(s), {objects} object(s) in {noun} {place}: {} damaged copy(ies), {} unreadable, {} object(s) without an intact copy",
                self.backups,
                self.damaged_copies(),
                self.unreadable_copies(),
                self.lost().count()
            ),
        }
    }
}
