//! `lifeboat list [JOB]`: committed backups, newest first, with their presence in each
//! repository.

use std::fmt;

use chrono::{DateTime, Utc};
use serde::Serialize;

use super::{human_duration, human_size};
use crate::config::Config;
use crate::error::Result;
use crate::inventory::{self, Presence};
use crate::layout;
use crate::repository::Repository;

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
}

#[derive(Debug, Serialize)]
pub struct ListReport {
    pub now: DateTime<Utc>,
    pub rows: Vec<ListRow>,
    /// Repositories that could not be listed, with the reason.
    pub unreachable: Vec<(String, String)>,
}

pub async fn run(config: &Config, options: &ListOptions) -> Result<ListReport> {
    let jobs: Vec<String> = match &options.job {
        Some(name) => vec![config.job(name)?.name.clone()],
        None => config.jobs.iter().map(|j| j.name.clone()).collect(),
    };
    let repositories = Repository::open_all(config).await;
    let mut rows = Vec::new();
    let mut unreachable = Vec::new();
    for job in &jobs {
        let survey = inventory::survey(&repositories, job).await;
        unreachable.extend(survey.unreachable.iter().cloned());
        for id in survey.committed_ids().iter().rev() {
            let manifest = survey
                .manifest(job, id)
                .await
                .map(|(manifest, _, _)| manifest);
            let mut row = ListRow {
                job: job.clone(),
                id: id.clone(),
                created_at: manifest
                    .as_ref()
                    .map(|m| m.started_at)
                    .or_else(|| layout::parse_backup_id(id))
                    .unwrap_or_default(),
                stored_size: manifest.as_ref().map_or(0, |m| m.stored_size()),
                objects: manifest.as_ref().map_or(0, |m| m.objects.len()),
                present_in: Vec::new(),
                incomplete_in: Vec::new(),
                missing_from: Vec::new(),
            };
            for (repository, holdings) in &survey.listed {
                let holding = holdings.get(id).cloned().unwrap_or_default();
                let presence = match &manifest {
                    Some(manifest) => holding.presence(manifest),
                    // No readable manifest anywhere: nothing to hold it against.
                    None if holding.manifest => Presence::Incomplete,
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
        now: Utc::now(),
        rows,
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
        for (name, reason) in &self.unreachable {
            writeln!(
                f,
                "warning: repository '{name}' could not be listed: {reason}"
            )?;
        }
        Ok(())
    }
}
