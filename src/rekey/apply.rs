//! A rekey plan carried out, per backup: each stale object streamed through decrypt →
//! encrypt into a new object beside it, then the manifest replaced, then what it no longer
//! names removed; per WAL segment, a replacement in place.

use std::collections::BTreeSet;

use super::RepositoryRekey;
use super::plan::{JobRekey, is_current};
use crate::error::{Error, ErrorKind, Result};
use crate::keys::{self, Keyring, Recipients, WalNote};
use crate::layout;
use crate::manifest::{Manifest, encrypted_name};
use crate::repository::Repository;
use crate::storage::{self, Deletion};
use crate::transfer::StoredObject;

/// What a rekey writes with, in one repository.
pub(super) struct Rekey<'a> {
    pub repository: &'a Repository,
    pub keyring: &'a Keyring,
    pub recipients: &'a Recipients,
    pub stamp: &'a str,
    pub signer: Option<&'a crate::signing::Signer>,
}

impl Rekey<'_> {
    /// Carries out one job's plan. An error of kind Key (no identity opens what must be
    /// re-encrypted) is returned: it fails everywhere alike. Others are recorded.
    pub async fn job(&self, planned: JobRekey, outcome: &mut RepositoryRekey) -> Result<()> {
        outcome.failures.extend(planned.failures);
        for (id, _) in planned.backups {
            // Read again now: the manifest replaced is the one that is there.
            let manifest = match self.repository.read_manifest(&planned.job, &id).await {
                Ok(manifest) => manifest,
                Err(e) => {
                    outcome.failures.push(e.chain().join(": "));
                    continue;
                }
            };
            let stale = manifest
                .objects
                .iter()
                .filter(|o| !is_current(o, self.recipients))
                .count();
            match self.backup(manifest, stale, outcome).await {
                Ok(()) => {}
                Err(e) if e.kind() == ErrorKind::Key => return Err(e),
                Err(e) => outcome.failures.push(e.chain().join(": ")),
            }
        }
        for (key, note) in planned.wal {
            match self.wal_segment(&key, note).await {
                Ok(()) => outcome.wal_rekeyed += 1,
                Err(e) if e.kind() == ErrorKind::Key => return Err(e),
                Err(e) => {
                    // The next segments wait for the next run, as the plan was read.
                    outcome.failures.push(e.chain().join(": "));
                    break;
                }
            }
        }
        outcome.wal_already += planned.wal_already;
        Ok(())
    }

    async fn backup(
        &self,
        manifest: Manifest,
        stale: usize,
        outcome: &mut RepositoryRekey,
    ) -> Result<()> {
        if stale == 0 {
            outcome.backups_already += 1;
            return self.remove_unnamed(&manifest, outcome).await;
        }
        let mut objects = Vec::with_capacity(manifest.objects.len());
        for object in &manifest.objects {
            if is_current(object, self.recipients) {
                objects.push(object.clone());
                continue;
            }
            let new_name = encrypted_name(object.logical_name(), Some(self.stamp));
            let stored = StoredObject {
                repository: self.repository,
                manifest: &manifest,
                object,
            };
            let entry = stored
                .reseal(self.keyring, self.recipients, &new_name)
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
        let manifest_key = layout::manifest_key(&manifest.job, &manifest.id);
        let named: BTreeSet<String> = manifest
            .objects
            .iter()
            .map(|o| layout::object_key(&manifest.job, &manifest.id, &o.name))
            .chain([crate::signing::signature_key(&manifest_key), manifest_key])
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

    /// Re-encrypts one WAL segment in place; the replacement is atomic, so a kill leaves it
    /// readable by one set of keys or the other.
    async fn wal_segment(&self, key: &str, note: WalNote) -> Result<()> {
        let store = self.repository.store.as_ref();
        let place = format!("WAL file '{key}' in repository '{}'", self.repository.name);
        let identities = self.keyring.identities(&place)?;
        let stored = storage::get_bytes(store, key)
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
        storage::put_bytes(store, key, body)
            .await
            .map(|_| ())
            .map_err(|e| self.repository.error(&format!("replace '{key}'"), e))
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
