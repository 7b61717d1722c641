//! Removal in one repository, in the order that keeps every manifest whole: the journal
//! first (so an interrupted prune is finished by the next one instead of waiting out the
//! grace period), then per backup its manifest, its objects and its verify record, then
//! the leftovers; the journal goes last.

use std::collections::{BTreeMap, BTreeSet};

use bytes::Bytes;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::delete::{Removal, delete_keys};
use super::report::{JobPrune, Leftover, StaleClaim, StaleUpload};
use crate::inventory::{Holding, Survey};
use crate::layout;
use crate::repository::Repository;
use crate::storage;

#[derive(Debug, Serialize, Deserialize)]
struct Journal {
    started_at: DateTime<Utc>,
    removing: Vec<String>,
}

/// What earlier prunes were removing in one repository, from their journals.
#[derive(Debug, Default)]
pub(super) struct Journals {
    pub removing: BTreeSet<String>,
    /// The journals read: the prune that finishes their work removes them.
    keys: Vec<String>,
}

impl Journals {
    pub fn keys(&self) -> &[String] {
        &self.keys
    }
}

/// What earlier prunes were removing, per repository from its own journals (one per run,
/// and the single journal older versions kept).
pub(super) async fn read_journal(survey: &Survey<'_>, job: &str) -> BTreeMap<String, Journals> {
    let mut journals = BTreeMap::new();
    for (repository, _) in &survey.listed {
        let store = repository.store.as_ref();
        let prefix = layout::prune_journals_prefix(job);
        let mut keys: Vec<String> = match store.list(&prefix).await {
            Ok(listed) => listed.into_iter().map(|o| o.key).collect(),
            Err(e) => {
                tracing::warn!(repository = %repository.name, prefix = %prefix, error = %e, "unable to list prune journals");
                Vec::new()
            }
        };
        keys.push(layout::legacy_prune_journal_key(job));
        let mut found = Journals::default();
        for key in keys {
            let Ok(bytes) = storage::get_bytes(store, &key).await else {
                continue;
            };
            match serde_json::from_slice::<Journal>(&bytes) {
                Ok(journal) => found.removing.extend(journal.removing),
                Err(e) => {
                    tracing::warn!(repository = %repository.name, key = %key, error = %e, "unreadable prune journal")
                }
            }
            found.keys.push(key);
        }
        if !found.keys.is_empty() {
            journals.insert(repository.name.clone(), found);
        }
    }
    journals
}

/// The keys of a backup besides its manifest: its objects, and the manifest's signature.
fn object_keys(job: &str, id: &str, holding: &Holding) -> Vec<String> {
    holding
        .objects
        .keys()
        .map(String::as_str)
        .chain(holding.signature.then_some(layout::MANIFEST_SIGNATURE_NAME))
        .map(|name| layout::object_key(job, id, name))
        .collect()
}

/// What one prune run removes from one repository: `removals` (committed backups the plan
/// lets go) and `leftovers`, of what the repository `held`.
pub(super) struct Removing<'a> {
    pub held: &'a BTreeMap<String, Holding>,
    pub removals: &'a [&'a String],
    pub leftovers: Vec<Leftover>,
    /// This run's tag, which names its journal, and the earlier journals it finishes.
    pub run: &'a str,
    pub earlier_journals: &'a [String],
}

/// Removes what `removing` names from one repository, recording what happened in `outcome`.
pub(super) async fn remove_from(
    repository: &Repository,
    job: &str,
    removing: Removing<'_>,
    dry_run: bool,
    outcome: &mut JobPrune,
) {
    let Removing {
        held,
        removals,
        leftovers,
        run,
        earlier_journals,
    } = removing;
    if removals.is_empty() && leftovers.is_empty() {
        // Journals of prunes whose work is all gone already.
        if !dry_run {
            for key in earlier_journals {
                let _ = repository.store.delete_unless_retained(key).await;
            }
        }
        return;
    }
    if dry_run {
        for id in removals {
            if let Some(backup) = outcome.backups.iter_mut().find(|b| &&b.id == id) {
                backup.removed_from.push(repository.name.clone());
            }
        }
        outcome.leftovers.extend(leftovers);
        return;
    }
    let journal_key = layout::prune_journal_key(job, run);
    let journal = Journal {
        started_at: Utc::now(),
        removing: removals
            .iter()
            .map(|id| id.to_string())
            .chain(leftovers.iter().map(|l| l.id.clone()))
            .collect(),
    };
    let body = Bytes::from(serde_json::to_vec_pretty(&journal).expect("journal serializes"));
    if let Err(e) = storage::put_bytes(repository.store.as_ref(), &journal_key, body).await {
        outcome.failures.push(format!(
            "writing the prune journal '{journal_key}' to repository '{}' (nothing removed there): {e}",
            repository.name
        ));
        return;
    }

    // Whether some id lost its manifest here but kept objects: the journal then stays, so the
    // next prune finishes it without waiting out the grace period.
    let mut unfinished = false;
    for id in removals {
        let holding = &held[id.as_str()];
        let mut removal = Removal::default();
        if holding.manifest {
            removal = delete_keys(repository, vec![layout::manifest_key(job, id)]).await;
            outcome.versions_removed += removal.versions;
        }
        // A manifest that stays (locked, or the delete failed) keeps its objects with it.
        if removal.complete() {
            removal = delete_keys(repository, object_keys(job, id, holding)).await;
            outcome.versions_removed += removal.versions;
            unfinished |= !removal.complete();
        }
        if removal.complete() {
            removal = delete_keys(repository, vec![layout::verified_key(job, id)]).await;
            outcome.versions_removed += removal.versions;
        }
        let backup = outcome
            .backups
            .iter_mut()
            .find(|b| &&b.id == id)
            .expect("every removal is in the plan");
        if removal.complete() {
            backup.removed_from.push(repository.name.clone());
        }
        backup.retained.extend(removal.retained);
        outcome.failures.extend(removal.failures);
    }
    for mut leftover in leftovers {
        let removal = delete_keys(
            repository,
            object_keys(job, &leftover.id, &held[&leftover.id]),
        )
        .await;
        outcome.versions_removed += removal.versions;
        leftover.removed = removal.complete();
        unfinished |= !removal.complete();
        leftover.retained = removal.retained;
        outcome.failures.extend(removal.failures);
        outcome.leftovers.push(leftover);
    }
    if unfinished {
        return;
    }
    // This run finished what the earlier journals named too: they were read into its plan.
    for key in std::iter::once(&journal_key).chain(earlier_journals) {
        if let Err(e) = repository.store.delete_unless_retained(key).await {
            outcome.failures.push(format!(
                "removing the prune journal '{key}' from repository '{}': {e}",
                repository.name
            ));
        }
    }
}

/// The backup ids of `job` a run claimed in `repository` less than [`CLAIM_MIN_AGE`] ago:
/// that run may still be writing them, whatever `--grace` says.
pub(super) async fn live_claims(
    repository: &Repository,
    job: &str,
    now: DateTime<Utc>,
) -> BTreeSet<String> {
    let prefix = layout::claims_prefix(job);
    let this_host = crate::host::name();
    let mut live = BTreeSet::new();
    for (key, written) in repository.claims(job).await.unwrap_or_default() {
        let Some(id) = key
            .strip_prefix(&prefix)
            .and_then(|name| name.strip_suffix(".json"))
        else {
            continue;
        };
        if written.is_some_and(|at| at <= now - CLAIM_MIN_AGE) {
            continue;
        }
        // A run of this host that was killed (SIGKILL, a crash) holds nothing.
        if repository
            .read_claim(job, id)
            .await
            .is_some_and(|claim| claim.run_is_gone(&this_host))
        {
            continue;
        }
        live.insert(id.to_string());
    }
    live
}

/// Aborts uploads of `job` started before `before`: a backup still running is younger, and
/// one whose id is claimed (`live`) is left to its run.
pub(super) async fn abort_stale_uploads(
    repository: &Repository,
    job: &str,
    (before, live): (DateTime<Utc>, &BTreeSet<String>),
    dry_run: bool,
    outcome: &mut JobPrune,
) {
    let uploads = match repository
        .store
        .list_incomplete(&format!("jobs/{job}/"))
        .await
    {
        Ok(uploads) => uploads,
        Err(e) => {
            outcome.failures.push(format!(
                "listing incomplete uploads in repository '{}': {e}",
                repository.name
            ));
            return;
        }
    };
    let claimed = |key: &str| {
        live.iter()
            .any(|id| key.starts_with(&layout::backup_prefix(job, id)))
    };
    for upload in uploads
        .into_iter()
        .filter(|u| u.initiated.is_some_and(|at| at < before) && !claimed(&u.key))
    {
        let aborted = if dry_run {
            false
        } else {
            match repository.store.abort_incomplete(&upload).await {
                Ok(()) => true,
                Err(e) => {
                    outcome.failures.push(format!(
                        "aborting the upload of '{}' in repository '{}': {e}",
                        upload.key, repository.name
                    ));
                    false
                }
            }
        };
        outcome.stale_uploads.push(StaleUpload {
            repository: repository.name.clone(),
            key: upload.key,
            initiated: upload.initiated,
            aborted,
        });
    }
}

/// However short `--grace`, a claim younger than this stays: its run may still be writing
/// (the claim is all that keeps another run out of its backup).
const CLAIM_MIN_AGE: chrono::Duration = chrono::Duration::hours(1);

/// Removes the claims on backup ids (see `claim`) written before `before` and at least
/// [`CLAIM_MIN_AGE`] ago: a run still claiming is younger, and a finished run removed its own.
/// Only claims named as lifeboat names them (`ID.json`, a regular object) are touched.
pub(super) async fn remove_stale_claims(
    repository: &Repository,
    job: &str,
    before: DateTime<Utc>,
    dry_run: bool,
    outcome: &mut JobPrune,
) {
    let claims = match repository.claims(job).await {
        Ok(claims) => claims,
        Err(e) => {
            outcome.failures.push(e.chain().join(": "));
            return;
        }
    };
    let prefix = layout::claims_prefix(job);
    let this_host = crate::host::name();
    let floor = Utc::now() - CLAIM_MIN_AGE;
    for (key, written) in claims {
        let Some(id) = key
            .strip_prefix(&prefix)
            .and_then(|name| name.strip_suffix(".json"))
            .filter(|id| layout::parse_backup_id(id).is_some())
            .map(str::to_string)
        else {
            continue;
        };
        let claimed_at = written.or_else(|| layout::parse_backup_id(&id));
        if claimed_at.is_none_or(|at| at >= before) {
            continue;
        }
        // Younger than the floor, only a claim whose run is known to be gone goes.
        if claimed_at.is_some_and(|at| at > floor)
            && !repository
                .read_claim(job, &id)
                .await
                .is_some_and(|claim| claim.run_is_gone(&this_host))
        {
            continue;
        }
        let removed = !dry_run
            && match repository.store.delete_unless_retained(&key).await {
                Ok(_) => true,
                Err(e) => {
                    outcome.failures.push(format!(
                        "removing the claim '{key}' from repository '{}': {e}",
                        repository.name
                    ));
                    false
                }
            };
        outcome.stale_claims.push(StaleClaim {
            repository: repository.name.clone(),
            id,
            written,
            removed,
        });
    }
}
