//! `lifeboat list [JOB]`: committed backups, newest first, with their presence in each
//! repository.

use std::collections::BTreeMap;
use std::fmt;

use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::config::Config;
use crate::error::Result;
use crate::human::{human_duration, human_size};
use crate::inventory::{self, Presence};
use crate::layout;
use crate::manifest::Manifest;
use crate::repository::Repository;
use crate::window::Window;

pub struct ListOptions {
    pub job: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct ListRow {
    pub job: String,
    pub id: String,
    pub created_at: DateTime<Utc>,
    pub stored_size: u64,
    pub objects: usize,
    /// Repositories holding the manifest and every object, in config order.
    pub present_in: Vec<String>,
    /// Repositories holding part of it (for `lifeboat replicate` to complete).
    pub incomplete_in: Vec<String>,
    /// Repositories holding none of it (unreachable ones are not counted here).
    pub missing_from: Vec<String>,
    /// Repositories holding a manifest of it that no repository holds readable: damage for
    /// `lifeboat verify` to name, not a backup to restore.
    pub damaged_in: Vec<String>,
    /// Dated ahead of the repositories' clock: made by a host whose clock ran fast.
    pub in_the_future: bool,
}

/// What one repository restores one job to.
#[derive(Debug, Serialize)]
pub struct JobWindow {
    pub job: String,
    #[serde(flatten)]
    pub window: Window,
}

#[derive(Debug, Serialize)]
pub struct ListReport {
    pub now: DateTime<Utc>,
    pub rows: Vec<ListRow>,
    /// Each repository's restorable window of each job, judged by what it holds alone.
    pub windows: Vec<JobWindow>,
    /// Repositories that could not be listed, with the reason.
    pub unreachable: Vec<(String, String)>,
}

/// Rows come from one listing per repository and every backup's manifest (32 read at a
/// time): the listing says what is there, the manifest what should be, and only both tell
/// an object cut short, a manifest copied under another id, or (with `trusted_signers`) a
/// planted one. `verify` reads the objects too.
pub async fn run(config: &Config, options: &ListOptions) -> Result<ListReport> {
    let jobs: Vec<String> = match &options.job {
        Some(name) => vec![config.job(name)?.name.clone()],
        None => config.jobs.iter().map(|j| j.name.clone()).collect(),
    };
    let repositories = Repository::open_all(config).await;
    let now = crate::clock::read(&repositories).await.clock().now();
    let mut rows = Vec::new();
    let mut windows = Vec::new();
    let mut unreachable = Vec::new();
    for job in &jobs {
        let survey = inventory::survey(&repositories, job).await;
        unreachable.extend(survey.unreachable.iter().cloned());
        let kind = config.job(job)?.backup_kind();
        for (repository, _) in &survey.listed {
            // A window that cannot be read leaves the rows as they are; status says why.
            if let Ok((window, _)) = crate::window::of_repository(repository, job, kind).await {
                windows.push(JobWindow {
                    job: job.clone(),
                    window,
                });
            }
        }
        let mut ids = survey.committed_ids();
        ids.reverse();
        // Every manifest is read: a listing alone cannot tell an object cut short from a
        // whole one, a manifest copied under another id from its own, or a planted one from
        // a signed one.
        let unsettled = ids.clone();
        let mut manifests: BTreeMap<String, Option<Manifest>> = unsettled
            .iter()
            .cloned()
            .zip(survey.manifests(job, &unsettled).await)
            .collect();
        for id in &ids {
            let manifest = manifests.remove(id).flatten();
            let expected = manifest.as_ref().map(inventory::object_sizes);
            let created_at = manifest
                .as_ref()
                .map(|m| m.started_at)
                .or_else(|| layout::parse_backup_id(id))
                .unwrap_or_default();
            let mut row = ListRow {
                job: job.clone(),
                id: id.clone(),
                created_at,
                in_the_future: crate::clock::in_the_future(
                    layout::parse_backup_id(id)
                        .unwrap_or(created_at)
                        .max(created_at),
                    now,
                    config.max_clock_skew,
                ),
                stored_size: expected.as_ref().map_or(0, |e| e.values().sum()),
                objects: expected.as_ref().map_or(0, BTreeMap::len),
                present_in: Vec::new(),
                incomplete_in: Vec::new(),
                missing_from: Vec::new(),
                damaged_in: Vec::new(),
            };
            for (repository, holdings) in &survey.listed {
                let holding = holdings.get(id).cloned().unwrap_or_default();
                let presence = match &expected {
                    Some(expected) => {
                        inventory::Survey::presence_in(
                            repository,
                            &holding,
                            job,
                            id,
                            expected,
                            manifest.as_ref(),
                        )
                        .await
                    }
                    // No readable manifest anywhere: nothing to hold it against.
                    None if holding.manifest => {
                        row.damaged_in.push(repository.name.clone());
                        continue;
                    }
                    None => Presence::Missing,
                };
                let name = repository.name.clone();
                match presence {
                    Presence::Complete => row.present_in.push(name),
                    Presence::Incomplete => row.incomplete_in.push(name),
                    Presence::Missing => row.missing_from.push(name),
                }
            }
            rows.push(row);
        }
    }
    unreachable.dedup();
    Ok(ListReport {
        now,
        rows,
        windows,
        unreachable,
    })
}

impl fmt::Display for ListReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.rows.is_empty() {
            writeln!(f, "no backups")?;
        } else {
            writeln!(
                f,
                "{:<16} {:<18} {:>10} {:>10} {:>7}  REPOSITORIES",
                "JOB", "BACKUP", "AGE", "SIZE", "OBJECTS"
            )?;
            for row in &self.rows {
                let age = (self.now - row.created_at).to_std().unwrap_or_default();
                let mut presence = row.present_in.join(",");
                if !row.incomplete_in.is_empty() {
                    presence.push_str(&format!(" (incomplete in {})", row.incomplete_in.join(",")));
                }
                if !row.missing_from.is_empty() {
                    presence.push_str(&format!(" (missing from {})", row.missing_from.join(",")));
                }
                if !row.damaged_in.is_empty() {
                    presence.push_str(&format!(
                        " (DAMAGED: unreadable manifest in {})",
                        row.damaged_in.join(",")
                    ));
                }
                if row.in_the_future {
                    presence.push_str(" (dated in the future)");
                }
                writeln!(
                    f,
                    "{:<16} {:<18} {:>10} {:>10} {:>7}  {}",
                    row.job,
                    row.id,
                    human_duration(age),
                    human_size(row.stored_size),
                    row.objects,
                    presence
                )?;
            }
        }
        for JobWindow { job, window } in &self.windows {
            writeln!(f, "{job}: {}", window.summary())?;
            for gap in &window.gaps {
                writeln!(f, "  GAP {}", gap.describe(&window.repository))?;
            }
        }
        for row in self.rows.iter().filter(|row| !row.damaged_in.is_empty()) {
            writeln!(
                f,
                "warning: backup {} of job '{}' has no readable manifest; run `lifeboat verify {}` to see what is damaged",
                row.id, row.job, row.job
            )?;
        }
        for row in self.rows.iter().filter(|row| row.in_the_future) {
            writeln!(
                f,
                "warning: backup {} of job '{}' is dated after now ({}): the host that made it had a clock running fast (or a repository's clock stepped back), and it sorts as newer than backups made since",
                row.id,
                row.job,
                self.now.format("%Y-%m-%d %H:%M:%S UTC")
            )?;
        }
        for (name, reason) in &self.unreachable {
            writeln!(
                f,
                "warning: repository '{name}' could not be listed: {reason}"
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use chrono::{Duration, TimeZone};

    use super::*;
    use crate::inventory::MANIFESTS_IN_FLIGHT;
    use crate::manifest::ObjectEntry;
    use crate::pipeline::Digests;

    /// Two repositories; in `b` every third backup has an object of the wrong size (so its
    /// manifest must be read to tell which copy is whole: more of them than are read at
    /// once) and every fifth lacks its manifest. Rows come newest first, each with its own
    /// figures and the presence its listing and manifest show.
    #[tokio::test]
    async fn rows_are_judged_by_the_listings_and_by_the_manifest_where_they_disagree() {
        let root = tempfile::tempdir().unwrap();
        let config = Config::parse(
            &format!(
                "[[repository]]\nname = \"a\"\ntype = \"local\"\npath = \"{0}/a\"\n\n\
                 [[repository]]\nname = \"b\"\ntype = \"local\"\npath = \"{0}/b\"\n\n\
                 [[job]]\nname = \"conf\"\nkind = \"files\"\npaths = [\"/etc\"]\n",
                root.path().display()
            ),
            Path::new("/etc/lifeboat/test.toml"),
        )
        .unwrap();
        let count = MANIFESTS_IN_FLIGHT * 3 + 5;
        let first = Utc.with_ymd_and_hms(2026, 1, 1, 3, 0, 0).unwrap();
        let write = |repository: &str, key: String, bytes: &[u8]| {
            let path = root.path().join(repository).join(key);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, bytes).unwrap();
        };
        for number in 0..count {
            let at = first + Duration::hours(number as i64);
            let id = layout::backup_id(at);
            let mut manifest: Manifest = serde_json::from_value(serde_json::json!({
                "format": 1, "id": id, "job": "conf", "kind": "files",
                "started_at": at, "finished_at": at, "recovery_point": at,
                "tool_version": "0", "host": "h", "source": {}, "objects": []
            }))
            .unwrap();
            let size = 1000 + number;
            manifest.objects.push(ObjectEntry::zstd(
                "files.tar.zst",
                &Digests {
                    size: size as u64,
                    sha256: String::new(),
                    raw_size: size as u64,
                    raw_sha256: String::new(),
                    ..Digests::default()
                },
            ));
            let object = layout::object_key("conf", &id, "files.tar.zst");
            write("a", layout::manifest_key("conf", &id), &manifest.to_json());
            write("a", object.clone(), &vec![0; size]);
            let damaged = number % 3 == 0;
            write("b", object, &vec![0; if damaged { size - 1 } else { size }]);
            if number % 5 != 0 {
                write("b", layout::manifest_key("conf", &id), &manifest.to_json());
            }
        }

        let report = run(
            &config,
            &ListOptions {
                job: Some("conf".into()),
            },
        )
        .await
        .unwrap();

        assert_eq!(report.rows.len(), count);
        for (row, number) in report.rows.iter().zip((0..count).rev()) {
            let at = first + Duration::hours(number as i64);
            assert_eq!(row.id, layout::backup_id(at));
            assert_eq!(row.created_at, at);
            assert_eq!(row.stored_size, 1000 + number as u64, "{}", row.id);
            assert_eq!(row.objects, 1);
            let whole_in_b = number % 3 != 0 && number % 5 != 0;
            let (present, incomplete): (&[&str], &[&str]) = match whole_in_b {
                true => (&["a", "b"], &[]),
                false => (&["a"], &["b"]),
            };
            assert_eq!(row.present_in, present, "{}", row.id);
            assert_eq!(row.incomplete_in, incomplete, "{}", row.id);
        }
    }
}
