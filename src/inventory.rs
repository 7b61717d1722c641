//! What each repository holds of a job, from one listing per repository: per backup id, the
//! objects and their sizes and whether the manifest is there. `list` reports it and
//! `replicate` fills in what is missing from it.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::error::Result;
use crate::layout;
use crate::manifest::Manifest;
use crate::repository::Repository;

/// One backup id's keys in one repository.
#[derive(Debug, Default, Clone)]
pub struct Holding {
    pub manifest: bool,
    /// Object name → stored size.
    pub objects: BTreeMap<String, u64>,
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
        let complete = self.manifest
            && manifest
                .objects
                .iter()
                .all(|o| self.objects.get(&o.name) == Some(&o.size));
        match (complete, self.manifest || !self.objects.is_empty()) {
            (true, _) => Presence::Complete,
            (false, true) => Presence::Incomplete,
            (false, false) => Presence::Missing,
        }
    }
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
        if name == layout::MANIFEST_NAME {
            holding.manifest = true;
        } else {
            holding.objects.insert(name.to_string(), object.size);
        }
    }
    Ok(holdings)
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
