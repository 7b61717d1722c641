//! `lifeboat list [JOB]`: committed backups, newest first, with their presence in each
//! repository.

use std::collections::BTreeMap;
use std::fmt;

use chrono::{DateTime, Utc};
use serde::Serialize;

use super::{human_duration, human_size};
use crate::config::Config;
use crate::error::{Error, Result};
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
    pub present_in: Vec<String>,
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
        // id → the repositories holding it, in config order.
        let mut presence: BTreeMap<String, Vec<&Repository>> = BTreeMap::new();
        for repository in &repositories {
            match repository.backup_ids(job).await {
                Ok(ids) => {
                    for id in ids {
                        presence.entry(id).or_default().push(repository);
                    }
                }
                Err(e) => unreachable.push((repository.name.clone(), chain_text(&e))),
            }
        }
        for (id, holders) in presence.into_iter().rev() {
            let manifest = holders[0].read_manifest(job, &id).await;
            let (stored_size, objects) = manifest
                .as_ref()
                .map(|m| (m.stored_size(), m.objects.len()))
                .unwrap_or_default();
            let created_at = match &manifest {
                Ok(m) => m.started_at,
                Err(_) => layout::parse_backup_id(&id).unwrap_or_default(),
            };
            rows.push(ListRow {
                job: job.clone(),
                created_at,
                stored_size,
                objects,
                present_in: holders.iter().map(|r| r.name.clone()).collect(),
                missing_from: repositories
                    .iter()
                    .filter(|r| !holders.iter().any(|h| h.name == r.name))
                    .map(|r| r.name.clone())
                    .collect(),
                id,
            });
        }
    }
    unreachable.dedup();
    Ok(ListReport {
        now: Utc::now(),
        rows,
        unreachable,
    })
}

fn chain_text(e: &Error) -> String {
    e.chain().join(": ")
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
