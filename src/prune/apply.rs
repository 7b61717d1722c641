//! A job's plan carried out. Per repository, in the order that keeps every manifest whole:
//! the journal first (so an interrupted prune is finished by the next one instead of waiting
//! out the grace period), then per backup its manifest, its objects and its verify record,
//! then the leftovers; the journal goes last. Then stale uploads and claims, the removal
//! records, and the WAL no kept backup needs.

use std::collections::BTreeMap;

use bytes::Bytes;
use chrono::{DateTime, Utc};

use super::TOMBSTONE_DAYS;
use super::delete::{Removal, delete_keys};
use super::journal::Journal;
use super::plan::{JobPlan, RepositoryPlan};
use super::report::{JobPrune, StaleUpload};
use super::wal;
use crate::inventory::Holding;
use crate::layout;
use crate::repository::Tombstone;
use crate::storage;

/// Does what `plan` says and reports what each item came to.
pub(super) async fn apply(plan: JobPlan, now: DateTime<Utc>) -> JobPrune {
    let mut outcome = JobPrune::new(&plan.job, plan.unreachable.clone());
    outcome.refused = plan.refused.clone();
    outcome.backups = plan.backups.clone();
    if plan.repositories.is_empty() {
        return outcome;
    }
    record_intent(&plan, now, &mut outcome).await;
    let run = layout::run_tag();
    for planned in &plan.repositories {
        outcome.failures.extend(planned.failures.iter().cloned());
        remove_from(planned, &plan.job, &run, &mut outcome).await;
        abort_uploads(planned, &mut outcome).await;
        remove_claims(planned, &mut outcome).await;
    }
    record_removals(&plan, now, &mut outcome).await;
    match &plan.wal {
        Some(Ok(floors)) => {
            let repositories: Vec<_> = plan.repositories.iter().map(|p| &p.repository).collect();
            let pruned = wal::prune(
                &repositories,
                &plan.job,
                floors,
                wal::Mode::Remove,
                &mut outcome.failures,
            )
            .await;
            outcome.wal = Some(pruned);
        }
        Some(Err(why)) => outcome.wal_skipped = Some(why.clone()),
        None => {}
    }
    outcome
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

/// Removes the backups and leftovers `planned` names from its repository, recording what
/// happened in `outcome`.
async fn remove_from(planned: &RepositoryPlan, job: &str, run: &str, outcome: &mut JobPrune) {
    let repository = &planned.repository;
    if planned.removals.is_empty() && planned.leftovers.is_empty() {
        // Journals of prunes whose work is all gone already.
        for key in &planned.earlier_journals {
            let _ = repository.store.delete_unless_retained(key).await;
        }
        return;
    }
    let journal_key = layout::prune_journal_key(job, run);
    let journal = Journal {
        started_at: Utc::now(),
        removing: planned
            .removals
            .iter()
            .map(|(id, _)| id.clone())
            .chain(planned.leftovers.iter().map(|(l, _)| l.id.clone()))
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
    for (id, holding) in &planned.removals {
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
            .find(|b| &b.id == id)
            .expect("every removal is in the plan");
        if removal.complete() {
            backup.removed_from.push(repository.name.clone());
        }
        backup.retained.extend(removal.retained);
        outcome.failures.extend(removal.failures);
    }
    for (leftover, holding) in &planned.leftovers {
        let removal = delete_keys(repository, object_keys(job, &leftover.id, holding)).await;
        outcome.versions_removed += removal.versions;
        unfinished |= !removal.complete();
        let mut leftover = leftover.clone();
        leftover.removed = removal.complete();
        leftover.retained = removal.retained;
        outcome.failures.extend(removal.failures);
        outcome.leftovers.push(leftover);
    }
    if unfinished {
        return;
    }
    // This run finished what the earlier journals named too: they were read into its plan.
    for key in std::iter::once(&journal_key).chain(&planned.earlier_journals) {
        if let Err(e) = repository.store.delete_unless_retained(key).await {
            outcome.failures.push(format!(
                "removing the prune journal '{key}' from repository '{}': {e}",
                repository.name
            ));
        }
    }
}

async fn abort_uploads(planned: &RepositoryPlan, outcome: &mut JobPrune) {
    let repository = &planned.repository;
    for upload in &planned.stale_uploads {
        let aborted = match repository.store.abort_incomplete(upload).await {
            Ok(()) => true,
            Err(e) => {
                outcome.failures.push(format!(
                    "aborting the upload of '{}' in repository '{}': {e}",
                    upload.key, repository.name
                ));
                false
            }
        };
        outcome.stale_uploads.push(StaleUpload {
            repository: repository.name.clone(),
            key: upload.key.clone(),
            initiated: upload.initiated,
            aborted,
        });
    }
}

async fn remove_claims(planned: &RepositoryPlan, outcome: &mut JobPrune) {
    let repository = &planned.repository;
    for (claim, key) in &planned.stale_claims {
        let removed = match repository.store.delete_unless_retained(key).await {
            Ok(_) => true,
            Err(e) => {
                outcome.failures.push(format!(
                    "removing the claim '{key}' from repository '{}': {e}",
                    repository.name
                ));
                false
            }
        };
        let mut claim = claim.clone();
        claim.removed = removed;
        outcome.stale_claims.push(claim);
    }
}

/// Before anything is removed, records in every listed repository each backup the plan
/// removes somewhere: a prune stopped halfway (a signal, a crash) has then already told
/// `replicate` not to copy back what it had removed from one repository and not yet from
/// another. `record_removals` rewrites the records with what was done.
async fn record_intent(plan: &JobPlan, now: DateTime<Utc>, outcome: &mut JobPrune) {
    let mut removing: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    for planned in &plan.repositories {
        for (id, _) in &planned.removals {
            removing
                .entry(id)
                .or_default()
                .push(planned.repository.name.clone());
        }
    }
    for (id, removed_from) in removing {
        let tombstone = Tombstone {
            id: id.to_string(),
            removed_at: now,
            host: crate::host::name(),
            removed_from,
        };
        for planned in &plan.repositories {
            if let Err(e) = planned
                .repository
                .write_tombstone(&plan.job, &tombstone)
                .await
            {
                outcome.failures.push(e.chain().join(": "));
            }
        }
    }
}

/// Writes into every listed repository a removal record of each backup this run removed
/// anywhere, so `replicate` never copies it back from a repository that was out of reach
/// (or whose own plan keeps it); and drops records older than [`TOMBSTONE_DAYS`] of backups
/// no listed repository holds any more.
async fn record_removals(plan: &JobPlan, now: DateTime<Utc>, outcome: &mut JobPrune) {
    let job = plan.job.as_str();
    let removed: Vec<Tombstone> = outcome
        .backups
        .iter()
        .filter(|b| !b.removed_from.is_empty())
        .map(|b| Tombstone {
            id: b.id.clone(),
            removed_at: now,
            host: crate::host::name(),
            removed_from: b.removed_from.clone(),
        })
        .collect();
    // What the plan removed nowhere (Object Lock kept it, a delete failed) is not removed:
    // its record of intent (`record_intent`) goes.
    let not_removed: Vec<String> = outcome
        .backups
        .iter()
        .filter(|b| !b.keep && b.removed_from.is_empty())
        .map(|b| b.id.clone())
        .collect();
    let expiry = now - chrono::Duration::days(TOMBSTONE_DAYS);
    for planned in &plan.repositories {
        let repository = &planned.repository;
        for tombstone in &removed {
            match repository.write_tombstone(job, tombstone).await {
                Ok(()) => outcome.recorded += 1,
                Err(e) => outcome.failures.push(e.chain().join(": ")),
            }
        }
        for id in &not_removed {
            let key = layout::removed_key(job, id);
            if let Err(e) = repository.store.delete_unless_retained(&key).await {
                outcome.failures.push(
                    repository
                        .error(&format!("remove the removal record '{key}'"), e)
                        .chain()
                        .join(": "),
                );
            }
        }
        let Ok(tombstones) = repository.tombstones(job).await else {
            continue;
        };
        for (id, written) in tombstones {
            if plan.held_ids.contains(&id) || written.is_none_or(|at| at > expiry) {
                continue;
            }
            let key = layout::removed_key(job, &id);
            if let Err(e) = repository.store.delete(&key).await {
                outcome.failures.push(
                    repository
                        .error(&format!("remove the removal record '{key}'"), e)
                        .chain()
                        .join(": "),
                );
            }
        }
    }
}
