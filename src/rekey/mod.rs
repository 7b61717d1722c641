//! `lifeboat rekey [JOB] --add-recipient KEY --remove-recipient KEY`: re-encrypts the
//! stored backups (and archived WAL segments) of each job to the config's recipients plus
//! those added, minus those removed: after a key is lost or a person leaves, every backup
//! is readable by exactly the keys trusted now.
//!
//! Per repository and backup: each object whose recipients differ is streamed through
//! decrypt → encrypt into a new object beside it (`NAME.zst.STAMP.age`), its raw checksum
//! checked on the way; then the manifest is replaced to name the new objects; then the old
//! ones are removed. A rekey killed at any point leaves a manifest naming objects that are
//! all there (old ones readable by the old keys, new ones by the new); the next run goes on
//! and removes what an interrupted one left. WAL segments are replaced in place (each
//! replacement is atomic), so a kill leaves each segment readable by one set or the other.

mod apply;
mod plan;

use std::collections::BTreeSet;
use std::fmt;
use std::path::PathBuf;

use serde::Serialize;
use tracing::Instrument;

use crate::config::{Config, JobConfig};
use crate::error::{Error, ErrorKind, Result};
use crate::keys::{self, Keyring, Recipients};
use crate::layout;
use crate::repository::Repository;

use apply::Rekey;
pub use plan::JobRekey;
use plan::set_of;

pub struct RekeyOptions {
    pub job: Option<String>,
    pub add: Vec<String>,
    pub remove: Vec<String>,
    /// Say what would be re-encrypted; change nothing.
    pub dry_run: bool,
    /// Re-encrypt even when no configured identity could open the result.
    pub force: bool,
}

#[derive(Debug, Default, Serialize)]
pub struct RekeyReport {
    pub dry_run: bool,
    /// The recipients every object is encrypted to afterwards.
    pub recipients: Vec<String>,
    pub repositories: Vec<RepositoryRekey>,
    /// Why new backups would not be encrypted to `recipients` (the config differs).
    pub warnings: Vec<String>,
}

#[derive(Debug, Default, Serialize)]
pub struct RepositoryRekey {
    pub repository: String,
    /// Backups whose manifest now names objects encrypted to the recipients.
    pub backups_rekeyed: Vec<String>,
    pub backups_already: usize,
    pub objects_rekeyed: usize,
    pub wal_rekeyed: usize,
    pub wal_already: usize,
    /// Objects left by an earlier, interrupted rekey (or the old ones of this run) removed.
    pub leftovers_removed: usize,
    /// Old objects kept because Object Lock still retains them (they stay readable by the
    /// old keys until their date).
    pub retained: Vec<String>,
    pub failures: Vec<String>,
}

impl RekeyReport {
    pub fn outcome(&self) -> Result<()> {
        let failures: Vec<&String> = self
            .repositories
            .iter()
            .flat_map(|r| r.failures.iter())
            .collect();
        let Some(first) = failures.first() else {
            return Ok(());
        };
        let mut error = Error::new(
            ErrorKind::Storage,
            format!(
                "unable to re-encrypt everything: {} failure(s), the first: {first}",
                failures.len()
            ),
        );
        error = error.with_hint("every backup is still readable by the keys its manifest lists; run rekey again once the cause is fixed");
        Err(error)
    }
}

/// The recipients to re-encrypt to: the config's, plus `add`, minus `remove`.
fn target_recipients(config: &Config, options: &RekeyOptions) -> Result<(Recipients, Vec<String>)> {
    let configured: Vec<String> = config
        .encryption
        .as_ref()
        .map(|e| e.recipients.texts().to_vec())
        .unwrap_or_default();
    let mut texts = configured.clone();
    for (flag, keys) in [
        ("--add-recipient", &options.add),
        ("--remove-recipient", &options.remove),
    ] {
        for key in keys.iter() {
            keys::parse_recipient(key).map_err(|e| Error::usage(format!("{flag}: {e}")))?;
        }
    }
    for key in &options.add {
        if !texts.contains(&key.trim().to_string()) {
            texts.push(key.trim().to_string());
        }
    }
    // Bech32 is one key in either case.
    let removed: BTreeSet<String> = options
        .remove
        .iter()
        .map(|k| k.trim().to_ascii_lowercase())
        .collect();
    texts.retain(|k| !removed.contains(&k.to_ascii_lowercase()));
    if texts.is_empty() {
        return Err(Error::usage(
            "unable to rekey: no recipient would be left; every object needs at least one",
        )
        .with_hint("add the new key with --add-recipient in the same run"));
    }
    let recipients = Recipients::parse(&texts).map_err(Error::usage)?;
    if !options.force {
        refuse_locking_out(config, &texts)?;
    }
    let mut warnings = Vec::new();
    if set_of(&configured) != set_of(&texts) {
        warnings.push(format!(
            "[encryption] in '{}' still encrypts new backups to a different set; set recipients = [{}]",
            config.path.display(),
            texts
                .iter()
                .map(|t| format!("\"{t}\""))
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    Ok((recipients, warnings))
}

/// Refuses a set of recipients that no configured identity (`LIFEBOAT_IDENTITY_FILE`, and
/// `identity_file` in `[encryption]`) has a key of: after the rekey this host could restore
/// nothing, and the only way back would be a key kept somewhere else.
fn refuse_locking_out(config: &Config, texts: &[String]) -> Result<()> {
    let mut identity_files: Vec<(PathBuf, &str)> = Vec::new();
    if let Some(path) = std::env::var_os(keys::IDENTITY_ENV).filter(|p| !p.is_empty()) {
        identity_files.push((PathBuf::from(path), keys::IDENTITY_ENV));
    }
    if let Some(path) = config
        .encryption
        .as_ref()
        .and_then(|e| e.identity_file.clone())
    {
        identity_files.push((path, "identity_file in [encryption]"));
    }
    if identity_files.is_empty() {
        return Ok(());
    }
    let kept: BTreeSet<String> = texts
        .iter()
        .map(|t| t.trim().to_ascii_lowercase())
        .collect();
    let mut named = Vec::new();
    for (path, origin) in &identity_files {
        let own = keys::public_keys_of(path)?;
        if own
            .iter()
            .any(|key| kept.contains(&key.to_ascii_lowercase()))
        {
            return Ok(());
        }
        named.push(format!("'{}' (from {origin})", path.display()));
    }
    Err(Error::usage(format!(
        "unable to rekey: none of the recipients left is the key of a configured identity ({}); every backup would then be readable only with a key this host does not have",
        named.join(", ")
    ))
    .with_hint("keep one of them, or put the identity of a recipient that stays in the identity file beside the old one (one per line)")
    .with_hint("if that other key is safe and tested (`lifeboat drill` with it), pass --force"))
}

/// A rekey, prepared: the recipients, the jobs (their locks held until it is applied or
/// dropped), and the repositories fit to rekey. What is re-encrypted in one repository for
/// one job is decided by [`RekeyPlan::plan_job`] from its manifests and WAL notes just
/// before it is done: `--dry-run` prints it, `apply` carries out the same.
pub struct RekeyPlan {
    pub recipients: Recipients,
    pub warnings: Vec<String>,
    jobs: Vec<String>,
    /// Each repository, and why nothing is done there (not there, not whole), when so.
    repositories: Vec<(Repository, Option<String>)>,
    keyring: Keyring,
    signer: Option<crate::signing::Signer>,
    /// Names the new objects, one per run.
    stamp: String,
    _locks: Vec<crate::lock::JobLock>,
}

pub async fn run(config: &Config, options: &RekeyOptions) -> Result<RekeyReport> {
    let plan = plan(config, options).await?;
    match options.dry_run {
        true => Ok(plan.preview().await),
        false => plan.apply().await,
    }
}

/// Takes the jobs' locks, checks the signing key and each repository; reads only.
pub async fn plan(config: &Config, options: &RekeyOptions) -> Result<RekeyPlan> {
    let jobs: Vec<&JobConfig> = match &options.job {
        Some(name) => vec![config.job(name)?],
        None => config.jobs.iter().collect(),
    };
    let (recipients, warnings) = target_recipients(config, options)?;
    // Backups and prune of these jobs wait: a manifest being replaced must not be pruned.
    let mut locks = Vec::with_capacity(jobs.len());
    for job in &jobs {
        locks.push(crate::lock::acquire(config, &job.name, "rekey").await?);
    }
    // A rekeyed manifest is a new one: signed again, or refused where signatures are required.
    let signer = config.signing.signer()?;
    if signer.is_none() && config.signing.trust.required() {
        return Err(Error::usage(
            "rekey replaces manifests, and trusted_signers requires them signed: this host has no signing.key_file",
        )
        .with_hint("run rekey on a backup host, which holds the signing key"));
    }
    let all = Repository::open_all(config).await;
    let markers = crate::repository::read_markers(&all).await;
    let mut repositories = Vec::with_capacity(all.len());
    for (index, repository) in all.iter().enumerate() {
        // Re-encrypting "nothing" in a repository that is not there, or not whole, would
        // read as done.
        let unfit = match (&markers.held[index], markers.wiped(&all, index)) {
            (_, Some(wiped)) => Some(wiped.chain().join(": ")),
            (Err(e), None) => Some(e.chain().join(": ")),
            (Ok(false), None) => repository
                .check_present()
                .await
                .err()
                .map(|e| e.chain().join(": ")),
            (Ok(true), None) => None,
        };
        repositories.push((repository.clone(), unfit));
    }
    Ok(RekeyPlan {
        recipients,
        warnings,
        jobs: jobs.iter().map(|j| j.name.clone()).collect(),
        repositories,
        keyring: config.keyring(),
        signer,
        stamp: layout::backup_id(chrono::Utc::now()),
        _locks: locks,
    })
}

impl RekeyPlan {
    /// What is re-encrypted of `job` in `repository`, from what it holds now; reads only.
    pub async fn plan_job(&self, repository: &Repository, job: &str) -> JobRekey {
        let span = tracing::info_span!("rekey", job = %job, repository = %repository.name);
        plan::plan_job(repository, job, &self.recipients)
            .instrument(span)
            .await
    }

    fn report(&self, dry_run: bool) -> RekeyReport {
        RekeyReport {
            dry_run,
            recipients: self.recipients.texts().to_vec(),
            repositories: Vec::new(),
            warnings: self.warnings.clone(),
        }
    }

    /// What applying the plan would re-encrypt, changing nothing.
    pub async fn preview(self) -> RekeyReport {
        let mut report = self.report(true);
        for (repository, unfit) in &self.repositories {
            let mut outcome = RepositoryRekey {
                repository: repository.name.clone(),
                ..RepositoryRekey::default()
            };
            outcome.failures.extend(unfit.clone());
            for job in self.jobs.iter().filter(|_| unfit.is_none()) {
                let planned = self.plan_job(repository, job).await;
                outcome.failures.extend(planned.failures);
                for (id, stale) in planned.backups {
                    match stale {
                        0 => outcome.backups_already += 1,
                        _ => {
                            outcome.backups_rekeyed.push(id);
                            outcome.objects_rekeyed += stale;
                        }
                    }
                }
                outcome.wal_rekeyed += planned.wal.len();
                outcome.wal_already += planned.wal_already;
            }
            report.repositories.push(outcome);
        }
        report
    }

    /// Plans and carries out each job in each repository in turn. A key that opens nothing
    /// fails everywhere alike: the run stops at the first such error.
    pub async fn apply(self) -> Result<RekeyReport> {
        let mut report = self.report(false);
        for (repository, unfit) in &self.repositories {
            let mut outcome = RepositoryRekey {
                repository: repository.name.clone(),
                ..RepositoryRekey::default()
            };
            outcome.failures.extend(unfit.clone());
            let rekey = Rekey {
                repository,
                keyring: &self.keyring,
                recipients: &self.recipients,
                stamp: &self.stamp,
                signer: self.signer.as_ref(),
            };
            for job in self.jobs.iter().filter(|_| unfit.is_none()) {
                let planned = self.plan_job(repository, job).await;
                let span = tracing::info_span!("rekey", job = %job, repository = %repository.name);
                rekey.job(planned, &mut outcome).instrument(span).await?;
            }
            report.repositories.push(outcome);
        }
        Ok(report)
    }
}

impl fmt::Display for RekeyReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for warning in &self.warnings {
            writeln!(f, "warning: {warning}")?;
        }
        let verb = if self.dry_run {
            "would re-encrypt"
        } else {
            "re-encrypted"
        };
        writeln!(f, "recipients: {}", self.recipients.join(", "))?;
        for repository in &self.repositories {
            writeln!(
                f,
                "{}: {verb} {} object(s) of {} backup(s) ({} already), {} WAL segment(s) ({} already); removed {} replaced object(s)",
                repository.repository,
                repository.objects_rekeyed,
                repository.backups_rekeyed.len(),
                repository.backups_already,
                repository.wal_rekeyed,
                repository.wal_already,
                repository.leftovers_removed
            )?;
            for retained in &repository.retained {
                writeln!(
                    f,
                    "  RETAINED {retained} (Object Lock): still readable by the old keys until then"
                )?;
            }
            for failure in &repository.failures {
                writeln!(f, "  FAILED {failure}")?;
            }
        }
        Ok(())
    }
}
