//! What each repository holds of a job, from one listing per repository: per backup id, the
//! objects and their sizes and whether the manifest is there. `list` reports it and
//! `replicate` fills in what is missing from it.

use std::collections::BTreeMap;

use bytes::Bytes;
use futures::StreamExt;

use serde::Serialize;

use crate::error::Result;
use crate::layout;
use crate::manifest::Manifest;
use crate::repository::Repository;

/// How many manifests [`Survey::manifests`] reads at once.
pub const MANIFESTS_IN_FLIGHT: usize = 32;

/// One backup id's keys in one repository.
#[derive(Debug, Default, Clone)]
pub struct Holding {
    pub manifest: bool,
    /// Whether the manifest's signature (`manifest.json.minisig`) is there.
    pub signature: bool,
    /// Object name → stored size.
    pub objects: BTreeMap<String, u64>,
    /// When the newest of its keys was written, where the store says.
    pub newest: Option<chrono::DateTime<chrono::Utc>>,
}

/// How completely a repository holds a committed backup.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Presence {
    /// The manifest and every object it lists, at its stored size.
    Complete,
    /// Some of it: an object missing or of the wrong size, or objects without the manifest.
    Incomplete,
    Missing,
}

impl Holding {
    pub fn presence(&self, manifest: &Manifest) -> Presence {
        self.presence_of(&object_sizes(manifest))
    }

    /// Presence against the objects a backup is known to hold: name → stored size.
    pub fn presence_of(&self, expected: &BTreeMap<String, u64>) -> Presence {
        let complete = self.manifest
            && expected
                .iter()
                .all(|(name, size)| self.objects.get(name) == Some(size));
        match (complete, self.manifest || !self.objects.is_empty()) {
            (true, _) => Presence::Complete,
            (false, true) => Presence::Incomplete,
            (false, false) => Presence::Missing,
        }
    }
}

/// The objects `manifest` names: name → stored size, as a listing shows them.
pub fn object_sizes(manifest: &Manifest) -> BTreeMap<String, u64> {
    manifest
        .objects
        .iter()
        .map(|o| (o.name.clone(), o.size))
        .collect()
}

/// Everything `repository` holds under the backups of `job`, by backup id.
pub async fn holdings(repository: &Repository, job: &str) -> Result<BTreeMap<String, Holding>> {
    let prefix = layout::backups_prefix(job);
    let listed = repository
        .store
        .list(&prefix)
        .await
        .map_err(|e| repository.error(&format!("list backups of job '{job}'"), e))?;
    let mut holdings: BTreeMap<String, Holding> = BTreeMap::new();
    for object in listed {
        let Some((id, name)) = object
            .key
            .strip_prefix(&prefix)
            .and_then(|rest| rest.split_once('/'))
        else {
            continue;
        };
        if layout::parse_backup_id(id).is_none() || name.is_empty() || name.contains('/') {
            continue;
        }
        let holding = holdings.entry(id.to_string()).or_default();
        holding.newest = holding.newest.max(object.last_modified);
        if name == layout::MANIFEST_NAME {
            holding.manifest = true;
        } else if name == layout::MANIFEST_SIGNATURE_NAME {
            holding.signature = true;
        } else {
            holding.objects.insert(name.to_string(), object.size);
        }
    }
    Ok(holdings)
}

/// What every repository holds of one job, in config order; and the repositories that could
/// not be listed, with the reason.
pub struct Survey<'a> {
    pub listed: Vec<(&'a Repository, BTreeMap<String, Holding>)>,
    pub unreachable: Vec<(String, String)>,
}

/// Lists `job` in every repository once.
pub async fn survey<'a>(repositories: &'a [Repository], job: &str) -> Survey<'a> {
    let mut survey = Survey {
        listed: Vec::new(),
        unreachable: Vec::new(),
    };
    for repository in repositories {
        match holdings(repository, job).await {
            Ok(held) => survey.listed.push((repository, held)),
            Err(e) => survey
                .unreachable
                .push((repository.name.clone(), e.chain().join(": "))),
        }
    }
    survey
}

impl<'a> Survey<'a> {
    /// Ids with a manifest in at least one repository, oldest first.
    pub fn committed_ids(&self) -> Vec<String> {
        let mut ids: Vec<String> = self
            .listed
            .iter()
            .flat_map(|(_, held)| held.iter())
            .filter(|(_, holding)| holding.manifest)
            .map(|(id, _)| id.clone())
            .collect();
        ids.sort_unstable();
        ids.dedup();
        ids
    }

    /// The manifests of `ids`, in their order (`None` where none is readable), read
    /// [`MANIFESTS_IN_FLIGHT`] at a time: one after another, 10,000 backups in an S3 bucket
    /// cost 10,000 round trips end to end.
    pub async fn manifests(&self, job: &str, ids: &[String]) -> Vec<Option<Manifest>> {
        futures::stream::iter(ids)
            .map(|id| async move {
                self.manifest(job, id)
                    .await
                    .map(|(manifest, _, _)| manifest)
            })
            .buffered(MANIFESTS_IN_FLIGHT)
            .collect()
            .await
    }

    /// How completely `repository` (holding `holding` of `job/id`) holds the backup that
    /// `reference` (a manifest read elsewhere) describes, judged by its own manifest where
    /// it has one: two copies of a backup can name different objects and both be whole
    /// (`rekey` re-encrypts each repository into objects of its own names).
    pub async fn presence_in(
        repository: &Repository,
        holding: &Holding,
        job: &str,
        id: &str,
        reference: &BTreeMap<String, u64>,
        described: Option<&Manifest>,
    ) -> Presence {
        let presence = holding.presence_of(reference);
        if presence != Presence::Incomplete || !holding.manifest {
            return presence;
        }
        match own_manifest(repository, job, id).await {
            Some(own) if described.is_none_or(|described| own.same_backup(described)) => {
                holding.presence(&own)
            }
            _ => Presence::Incomplete,
        }
    }

    /// The first readable manifest of `job/id` in config order: parsed, its exact bytes, and
    /// the repository it came from.
    pub async fn manifest(&self, job: &str, id: &str) -> Option<(Manifest, Bytes, &'a Repository)> {
        let key = layout::manifest_key(job, id);
        for (repository, held) in &self.listed {
            if !held.get(id).is_some_and(|h| h.manifest) {
                continue;
            }
            let Ok(bytes) = repository.manifest_bytes(job, id).await else {
                continue;
            };
            match repository.trusted_manifest(job, id, &bytes).await {
                Ok(manifest) => return Some((manifest, bytes, *repository)),
                Err(problem) => {
                    tracing::warn!(repository = %repository.name, key = %key, problem = %problem, "manifest not used")
                }
            }
        }
        None
    }
}

/// The manifest of `job/id` that `repository` holds, if it reads.
pub async fn own_manifest(repository: &Repository, job: &str, id: &str) -> Option<Manifest> {
    let bytes = repository.manifest_bytes(job, id).await.ok()?;
    repository.trusted_manifest(job, id, &bytes).await.ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::ObjectEntry;
    use crate::pipeline::Digests;

    fn manifest_of(objects: &[(&str, u64)]) -> Manifest {
        let mut manifest: Manifest = serde_json::from_str(
            r#"{"format":1,"id":"20261126T030000Z","job":"db","kind":"files",
                "started_at":"2026-11-26T03:00:00Z","finished_at":"2026-11-26T03:00:01Z",
                "recovery_point":"2026-11-26T03:00:00Z","tool_version":"0","host":"h",
                "source":{},"objects":[]}"#,
        )
        .unwrap();
        for (name, size) in objects {
            manifest.objects.push(ObjectEntry::zstd(
                name,
                &Digests {
                    size: *size,
                    sha256: String::new(),
                    raw_size: 0,
                    raw_sha256: String::new(),
                    ..Digests::default()
                },
            ));
        }
        manifest
    }

    #[test]
    fn presence_needs_the_manifest_and_every_object_at_its_size() {
        let manifest = manifest_of(&[("a.zst", 10), ("b.zst", 20)]);
        let mut holding = Holding::default();
        assert_eq!(holding.presence(&manifest), Presence::Missing);
        holding.objects.insert("a.zst".into(), 10);
        assert_eq!(holding.presence(&manifest), Presence::Incomplete);
        holding.objects.insert("b.zst".into(), 20);
        assert_eq!(holding.presence(&manifest), Presence::Incomplete);
        holding.manifest = true;
        assert_eq!(holding.presence(&manifest), Presence::Complete);
        holding.objects.insert("b.zst".into(), 19);
        assert_eq!(holding.presence(&manifest), Presence::Incomplete);
    }
}
