//! What `rekey` will re-encrypt, decided from the manifests and the WAL notes before
//! anything is written: per repository and job the backups with objects on other
//! recipients, and the WAL segments whose note names another set.

use std::collections::BTreeSet;

use crate::error::{Error, ErrorKind, Result};
use crate::keys::{self, Recipients, WalNote};
use crate::layout;
use crate::manifest::ObjectEntry;
use crate::repository::Repository;
use crate::storage;

/// One job in one repository.
pub struct JobRekey {
    pub job: String,
    /// Every backup whose manifest reads, and how many of its objects are on other
    /// recipients (none: only what an interrupted rekey left is removed). Applying reads
    /// each manifest again just before re-encrypting: it replaces the one it read.
    pub backups: Vec<(String, usize)>,
    /// Encrypted WAL segments on other recipients, with the note each carries.
    pub wal: Vec<(String, WalNote)>,
    pub wal_already: usize,
    /// What could not be read; what it would have named is left as it is.
    pub failures: Vec<String>,
}

pub fn set_of(texts: &[String]) -> BTreeSet<&str> {
    texts.iter().map(|t| t.trim()).collect()
}

/// Whether `object` is encrypted to exactly `recipients`.
pub fn is_current(object: &ObjectEntry, recipients: &Recipients) -> bool {
    object.is_encrypted() && set_of(&object.recipients) == set_of(recipients.texts())
}

/// Plans `job` in `repository`; reads only.
pub(super) async fn plan_job(
    repository: &Repository,
    job: &str,
    recipients: &Recipients,
) -> JobRekey {
    let mut planned = JobRekey {
        job: job.to_string(),
        backups: Vec::new(),
        wal: Vec::new(),
        wal_already: 0,
        failures: Vec::new(),
    };
    match repository.backup_ids(job).await {
        Ok(ids) => {
            for id in ids {
                // One manifest that does not read (damaged, planted, unsigned) is that
                // backup's failure: the others are still re-encrypted, so a bucket writer
                // cannot keep a leaked key in use by planting one.
                match repository.read_manifest(job, &id).await {
                    Ok(manifest) => {
                        let stale = manifest
                            .objects
                            .iter()
                            .filter(|o| !is_current(o, recipients))
                            .count();
                        planned.backups.push((manifest.id, stale));
                    }
                    Err(e) => planned.failures.push(e.chain().join(": ")),
                }
            }
        }
        Err(e) => {
            planned.failures.push(e.chain().join(": "));
            return planned;
        }
    }
    if let Err(e) = plan_wal(repository, job, recipients, &mut planned).await {
        planned.failures.push(e.chain().join(": "));
    }
    planned
}

/// The encrypted WAL segments whose note names another set of recipients. Segments archived
/// unencrypted stay as they are. The note is in the header: a segment is not downloaded
/// whole to learn it.
async fn plan_wal(
    repository: &Repository,
    job: &str,
    recipients: &Recipients,
    planned: &mut JobRekey,
) -> Result<()> {
    let store = repository.store.as_ref();
    let fingerprint = recipients.fingerprint();
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
    .map_err(|e| repository.error(&format!("list the WAL of job '{job}'"), e))?;
    for key in sealed {
        let header = storage::get_range_bytes(store, &key, Some(0..keys::HEADER_READ))
            .await
            .map_err(|e| repository.error(&format!("read '{key}'"), e))?;
        let note = keys::read_wal_note(&header).ok_or_else(|| {
            Error::new(
                ErrorKind::Verification,
                format!(
                    "unable to re-encrypt '{key}' in repository '{}': it has no lifeboat-wal note",
                    repository.name
                ),
            )
        })?;
        if note.fingerprint == fingerprint {
            planned.wal_already += 1;
        } else {
            planned.wal.push((key, note));
        }
    }
    Ok(())
}
