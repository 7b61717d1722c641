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

use std::collections::BTreeSet;
use std::fmt;
use std::path::PathBuf;

use serde::Serialize;
use tracing::Instrument;

use crate::config::{Config, JobConfig};
use crate::error::{Error, ErrorKind, Result};
use crate::keys::{self, Keyring, Recipients, WalNote};
use crate::layout;
use crate::manifest::{Manifest, ObjectEntry, encrypted_name};
use crate::repository::Repository;
use crate::storage::{self, Deletion};
use crate::transfer::reseal_object;

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

fn set_of(texts: &[String]) -> BTreeSet<&str> {
    texts.iter().map(|t| t.trim()).collect()
}

pub async fn run(config: &Config, options: &RekeyOptions) -> Result<RekeyReport> {
    let jobs: Vec<&JobConfig> = match &options.job {
        Some(name) => vec![config.job(name)?],
        None => config.jobs.iter().collect(),
    };
    let (recipients, warnings) = target_recipients(config, options)?;
    // Backups and prune of these jobs wait: a manifest being replaced must not be pruned.
    let mut held_locks = Vec::with_capacity(jobs.len());
    for job in &jobs {
        held_locks.push(crate::lock::acquire(config, &job.name, "rekey").await?);
    }
    let keyring = config.keyring();
    // A rekeyed manifest is a new one: signed again, or refused where signatures are required.
    let signer = config.signing.signer()?;
    if signer.is_none() && config.signing.trust.required() {
        return Err(Error::usage(
            "rekey replaces manifests, and trusted_signers requires them signed: this host has no signing.key_file",
        )
        .with_hint("run rekey on a backup host, which holds the signing key"));
    }
    let stamp = layout::backup_id(chrono::Utc::now());
    let mut report = RekeyReport {
        dry_run: options.dry_run,
        recipients: recipients.texts().to_vec(),
        repositories: Vec::new(),
        warnings,
    };
    let repositories = Repository::open_all(config).await;
    let markers = crate::repository::read_markers(&repositories).await;
    for (index, repository) in repositories.iter().enumerate() {
        let mut outcome = RepositoryRekey {
            repository: repository.name.clone(),
            ..RepositoryRekey::default()
        };
        // Re-encrypting "nothing" in a repository that is not there, or not whole, would
        // read as done.
        let unfit = match (&markers.held[index], markers.wiped(&repositories, index)) {
            (_, Some(wiped)) => Some(wiped.chain().join(": ")),
            (Err(e), None) => Some(e.chain().join(": ")),
            (Ok(false), None) => repository
                .check_present()
                .await
                .err()
                .map(|e| e.chain().join(": ")),
            (Ok(true), None) => None,
        };
        if let Some(why) = unfit {
            outcome.failures.push(why);
            report.repositories.push(outcome);
            continue;
        }
        let repository = repository.clone();
        let rekey = Rekey {
            repository: &repository,
            keyring: &keyring,
            recipients: &recipients,
            stamp: &stamp,
            signer: signer.as_ref(),
            dry_run: options.dry_run,
        };
        for job in &jobs {
            let span = tracing::info_span!("rekey", job = %job.name, repository = %repository.name);
            if let Err(e) = rekey.job(&job.name, &mut outcome).instrument(span).await {
                // A key that opens nothing fails everywhere alike: stop now.
                if e.kind() == ErrorKind::Key {
                    return Err(e);
                }
                outcome.failures.push(e.chain().join(": "));
            }
        }
        report.repositories.push(outcome);
    }
    drop(held_locks);
    Ok(report)
}

struct Rekey<'a> {
    repository: &'a Repository,
    keyring: &'a Keyring,
    recipients: &'a Recipients,
    stamp: &'a str,
    signer: Option<&'a crate::signing::Signer>,
    dry_run: bool,
}

impl Rekey<'_> {
    async fn job(&self, job: &str, outcome: &mut RepositoryRekey) -> Result<()> {
        for id in self.repository.backup_ids(job).await? {
            // One manifest that does not read (damaged, planted, unsigned) is that backup's
            // failure: the others are still re-encrypted, so a bucket writer cannot keep a
            // leaked key in use by planting one.
            let manifest = match self.repository.read_manifest(job, &id).await {
                Ok(manifest) => manifest,
                Err(e) => {
                    outcome.failures.push(e.chain().join(": "));
                    continue;
                }
            };
            match self.backup(manifest, outcome).await {
                Ok(()) => {}
                Err(e) if e.kind() == ErrorKind::Key => return Err(e),
                Err(e) => outcome.failures.push(e.chain().join(": ")),
            }
        }
        self.wal(job, outcome).await
    }

    fn is_current(&self, object: &ObjectEntry) -> bool {
        object.is_encrypted() && set_of(&object.recipients) == set_of(self.recipients.texts())
    }

    async fn backup(&self, manifest: Manifest, outcome: &mut RepositoryRekey) -> Result<()> {
        let stale = manifest
            .objects
            .iter()
            .filter(|o| !self.is_current(o))
            .count();
        if stale == 0 {
            outcome.backups_already += 1;
            if !self.dry_run {
                self.remove_unnamed(&manifest, outcome).await?;
            }
            return Ok(());
        }
        if self.dry_run {
            outcome.backups_rekeyed.push(manifest.id.clone());
            outcome.objects_rekeyed += stale;
            return Ok(());
        }
        let mut objects = Vec::with_capacity(manifest.objects.len());
        for object in &manifest.objects {
            if self.is_current(object) {
                objects.push(object.clone());
                continue;
            }
            let new_name = encrypted_name(object.logical_name(), Some(self.stamp));
            let entry = reseal_object(
                self.repository,
                &manifest,
                object,
                self.keyring,
                self.recipients,
                &new_name,
            )
            .await?;
            tracing::info!(backup = %manifest.id, object = %object.name, new = %entry.name, "re-encrypted");
            objects.push(entry);
            outcome.objects_rekeyed += 1;
        }
        let rekeyed = Manifest {
            objects,
            ..manifest
        };
        self.repository
            .replace_manifest(&rekeyed, self.signer)
            .await?;
        outcome.backups_rekeyed.push(rekeyed.id.clone());
        self.remove_unnamed(&rekeyed, outcome).await
    }

    /// Removes every key in the backup's directory its manifest does not name: the objects
    /// a rekey replaced, and new ones an interrupted rekey stored but never committed; and
    /// aborts the uploads an interrupted rekey left open there (the job lock is held, so no
    /// backup of this job is writing).
    async fn remove_unnamed(
        &self,
        manifest: &Manifest,
        outcome: &mut RepositoryRekey,
    ) -> Result<()> {
        let prefix = layout::backup_prefix(&manifest.job, &manifest.id);
        let store = self.repository.store.as_ref();
        let listed = store
            .list(&prefix)
            .await
            .map_err(|e| self.repository.error(&format!("list '{prefix}'"), e))?;
        let named: BTreeSet<String> = manifest
            .objects
            .iter()
            .map(|o| layout::object_key(&manifest.job, &manifest.id, &o.name))
            .chain([layout::manifest_key(&manifest.job, &manifest.id)])
            .chain([crate::signing::signature_key(&layout::manifest_key(
                &manifest.job,
                &manifest.id,
            ))])
            .collect();
        let open = store.list_incomplete(&prefix).await.map_err(|e| {
            self.repository
                .error(&format!("list open uploads under '{prefix}'"), e)
        })?;
        for upload in &open {
            store.abort_incomplete(upload).await.map_err(|e| {
                self.repository
                    .error(&format!("abort the upload of '{}'", upload.key), e)
            })?;
            outcome.leftovers_removed += 1;
        }
        for object in listed.iter().filter(|o| !named.contains(&o.key)) {
            match store.delete_unless_retained(&object.key).await {
                Ok(Deletion::Deleted { .. }) => outcome.leftovers_removed += 1,
                Ok(Deletion::Retained { until }) => outcome.retained.push(match until {
                    Some(until) => format!("{} (until {})", object.key, until.to_rfc3339()),
                    None => format!("{} (legal hold)", object.key),
                }),
                Err(e) => {
                    return Err(self
                        .repository
                        .error(&format!("remove the replaced object '{}'", object.key), e));
                }
            }
        }
        Ok(())
    }

    /// Re-encrypts, in place, every encrypted WAL segment whose note names another set of
    /// recipients. Segments archived unencrypted stay as they are.
    async fn wal(&self, job: &str, outcome: &mut RepositoryRekey) -> Result<()> {
        let store = self.repository.store.as_ref();
        let fingerprint = self.recipients.fingerprint();
        let mut sealed = Vec::new();
        storage::for_each_page(
            store,
            &layout::wal_prefix(job),
            crate::wal_archive::WAL_PAGE,
            async |page| {
                sealed.extend(page.into_iter().map(|o| o.key).filter(|key| {
                    key.ends_with(".age") && layout::wal_file_of_key(job, key).is_some()
                }));
            },
        )
        .await
        .map_err(|e| {
            self.repository
                .error(&format!("list the WAL of job '{job}'"), e)
        })?;
        for key in sealed {
            // The note is in the header: a segment already on these recipients is not
            // downloaded whole.
            let header = storage::get_range_bytes(store, &key, Some(0..keys::HEADER_READ))
                .await
                .map_err(|e| self.repository.error(&format!("read '{key}'"), e))?;
            let note = keys::read_wal_note(&header).ok_or_else(|| {
                Error::new(
                    ErrorKind::Verification,
                    format!("unable to re-encrypt '{key}' in repository '{}': it has no lifeboat-wal note", self.repository.name),
                )
            })?;
            if note.fingerprint == fingerprint {
                outcome.wal_already += 1;
                continue;
            }
            if self.dry_run {
                outcome.wal_rekeyed += 1;
                continue;
            }
            let place = format!("WAL file '{key}' in repository '{}'", self.repository.name);
            let identities = self.keyring.identities(&place)?;
            let stored = storage::get_bytes(store, &key)
                .await
                .map_err(|e| self.repository.error(&format!("read '{key}'"), e))?;
            let recipients = self.recipients.clone();
            let resealed = tokio::task::spawn_blocking(move || {
                reseal_wal(&stored, &note, &identities, &recipients)
            })
            .await
            .map_err(|e| {
                Error::new(ErrorKind::Storage, "the re-encrypting thread stopped").with_source(e)
            })?;
            let body = match resealed {
                Ok(body) => body,
                Err(WalReseal::NoMatchingKey) => return Err(self.keyring.no_match(&place, &[])),
                Err(WalReseal::Damaged(problem)) => {
                    return Err(Error::new(
                        ErrorKind::Verification,
                        format!("damaged {place}: {problem}"),
                    ));
                }
            };
            storage::put_bytes(store, &key, body)
                .await
                .map_err(|e| self.repository.error(&format!("replace '{key}'"), e))?;
            outcome.wal_rekeyed += 1;
        }
        Ok(())
    }
}

enum WalReseal {
    NoMatchingKey,
    Damaged(String),
}

/// The WAL object `stored`, decrypted, checked against its note's raw sha256, and encrypted
/// to `recipients` with a new note.
fn reseal_wal(
    stored: &[u8],
    note: &WalNote,
    identities: &[keys::Identity],
    recipients: &Recipients,
) -> std::result::Result<bytes::Bytes, WalReseal> {
    use std::io::{Read, Write};
    let mut compressed = Vec::with_capacity(stored.len());
    keys::open(stored, identities)
        .map_err(|e| match e {
            keys::OpenError::NoMatchingKey => WalReseal::NoMatchingKey,
            keys::OpenError::Damaged(problem) => WalReseal::Damaged(problem),
        })?
        .read_to_end(&mut compressed)
        .map_err(|e| WalReseal::Damaged(e.to_string()))?;
    let raw_sha256 = crate::wal_archive::raw_sha256_of_stored(&compressed)
        .map_err(|e| WalReseal::Damaged(format!("its zstd frame does not decode: {e}")))?;
    if raw_sha256 != note.raw_sha256 {
        return Err(WalReseal::Damaged(format!(
            "it decodes to sha256 {raw_sha256}, its note says {}",
            note.raw_sha256
        )));
    }
    let new_note = WalNote {
        raw_sha256,
        fingerprint: recipients.fingerprint(),
    };
    let mut sealed = Vec::with_capacity(stored.len());
    let written = (|| -> std::io::Result<()> {
        let mut writer = recipients
            .encryptor(Some(&new_note))?
            .wrap_output(&mut sealed)?;
        writer.write_all(&compressed)?;
        writer.finish().map(|_| ())
    })();
    written.map_err(|e| WalReseal::Damaged(e.to_string()))?;
    Ok(bytes::Bytes::from(sealed))
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
