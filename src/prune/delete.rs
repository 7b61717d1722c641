//! Keys removed from one repository, many at a time, each either gone, kept by Object Lock,
//! or failed.

use futures::StreamExt;

use super::report::Retained;
use crate::repository::Repository;
use crate::storage::Deletion;

/// Deletes in flight per repository: enough to hide S3 latency, few enough to be polite.
const DELETES_IN_FLIGHT: usize = 16;

#[derive(Default)]
pub(super) struct Removal {
    pub retained: Vec<Retained>,
    pub failures: Vec<String>,
    /// Stored versions removed with the keys, where the bucket keeps versions.
    pub versions: u64,
}

impl Removal {
    pub fn complete(&self) -> bool {
        self.retained.is_empty() && self.failures.is_empty()
    }
}

pub(super) async fn delete_keys(repository: &Repository, keys: Vec<String>) -> Removal {
    futures::stream::iter(keys)
        .map(|key| async move {
            let result = repository.store.delete_unless_retained(&key).await;
            (key, result)
        })
        .buffer_unordered(DELETES_IN_FLIGHT)
        .fold(
            Removal::default(),
            |mut removal, (key, result)| async move {
                match result {
                    Ok(Deletion::Deleted { versions }) => removal.versions += u64::from(versions),
                    Ok(Deletion::Retained { until }) => removal.retained.push(Retained {
                        repository: repository.name.clone(),
                        key,
                        until,
                    }),
                    Err(e) => removal.failures.push(format!(
                        "removing '{key}' from repository '{}': {e}",
                        repository.name
                    )),
                }
                removal
            },
        )
        .await
}
