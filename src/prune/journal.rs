//! Prune journals: before a prune removes anything from a repository it writes there what it
//! is removing, so that one interrupted halfway is finished by the next prune instead of
//! waiting out the grace period.

use std::collections::{BTreeMap, BTreeSet};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::inventory::Survey;
use crate::layout;
use crate::storage;

#[derive(Debug, Serialize, Deserialize)]
pub(super) struct Journal {
    pub started_at: DateTime<Utc>,
    pub removing: Vec<String>,
}

/// What earlier prunes were removing in one repository, from their journals.
#[derive(Debug, Default, Clone)]
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
pub(super) async fn read(survey: &Survey<'_>, job: &str) -> BTreeMap<String, Journals> {
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
