//! `lifeboat drill history [NAME]`: past drills from the reports kept in the repositories,
//! newest first.

use std::collections::BTreeMap;
use std::fmt;

use chrono::{DateTime, Utc};
use serde::Serialize;

use super::DrillReport;
use crate::config::Config;
use crate::error::Result;
use crate::human::human_duration;
use crate::layout;
use crate::repository::Repository;
use crate::storage;

#[derive(Debug, Serialize)]
pub struct HistoryRow {
    pub drill: String,
    pub declared_at: DateTime<Utc>,
    pub passed: bool,
    pub rto_seconds: f64,
    pub rpo_seconds: f64,
    pub job: String,
    pub backup: String,
    /// What the restore moved and how long it took: the rate a projected RTO uses.
    pub restored_bytes: u64,
    pub restore_seconds: f64,
    /// A files or physical drill's rates apart from its fixed time (see `rto_model`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rates: Option<crate::rto_model::RestoreRates>,
    /// The repositories keeping this report.
    pub kept_in: Vec<String>,
}

#[derive(Debug, Serialize)]
pub struct DrillHistory {
    pub rows: Vec<HistoryRow>,
    pub unreachable: Vec<(String, String)>,
}

pub async fn history(config: &Config, name: Option<&str>) -> Result<DrillHistory> {
    let prefix = match name {
        Some(name) => format!("{}{name}/", layout::DRILLS_PREFIX),
        None => layout::DRILLS_PREFIX.to_string(),
    };
    // key → the repositories holding it, in config order.
    let mut holders: BTreeMap<String, Vec<Repository>> = BTreeMap::new();
    let mut unreachable = Vec::new();
    for repository in Repository::open_all(config).await {
        match repository.store.list(&prefix).await {
            Ok(objects) => {
                for object in objects.into_iter().filter(|o| o.key.ends_with(".json")) {
                    holders
                        .entry(object.key)
                        .or_default()
                        .push(repository.clone());
                }
            }
            Err(e) => unreachable.push((
                repository.name.clone(),
                repository.error("list drill reports", e).chain().join(": "),
            )),
        }
    }
    let mut rows = Vec::new();
    for (key, repositories) in holders {
        let mut report: Option<DrillReport> = None;
        for repository in &repositories {
            if let Ok(bytes) = storage::get_bytes(repository.store.as_ref(), &key).await
                && let Ok(parsed) = serde_json::from_slice::<DrillReport>(&bytes)
            {
                report = Some(parsed);
                break;
            }
        }
        let Some(report) = report else {
            tracing::warn!(key = %key, "unreadable drill report");
            continue;
        };
        // A report is read from a bucket: its texts are shown, so none may start a line or
        // drive the terminal.
        let shown = |text: String| crate::error::escape_controls(&text).into_owned();
        rows.push(HistoryRow {
            drill: shown(report.drill),
            declared_at: report.declared_at,
            passed: report.passed,
            rto_seconds: report.rto.measured_seconds,
            rpo_seconds: report.rpo.measured_seconds,
            job: shown(report.job),
            backup: shown(report.backup),
            restored_bytes: report.restored_bytes,
            restore_seconds: report.restore_seconds,
            rates: report.projection.and_then(|p| p.rates),
            kept_in: repositories.iter().map(|r| r.name.clone()).collect(),
        });
    }
    rows.sort_by_key(|row| std::cmp::Reverse(row.declared_at));
    Ok(DrillHistory { rows, unreachable })
}

impl fmt::Display for DrillHistory {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.rows.is_empty() {
            writeln!(f, "no drills on record")?;
        } else {
            writeln!(
                f,
                "{:<20} {:<25} {:<7} {:>9} {:>9}  {:<18} REPOSITORIES",
                "DRILL", "DECLARED", "VERDICT", "RTO", "RPO", "BACKUP"
            )?;
        }
        for row in &self.rows {
            let duration = |s: f64| human_duration(std::time::Duration::from_secs_f64(s.max(0.0)));
            writeln!(
                f,
                "{:<20} {:<25} {:<7} {:>9} {:>9}  {:<18} {}",
                row.drill,
                row.declared_at.format("%Y-%m-%d %H:%M:%S UTC"),
                if row.passed { "PASS" } else { "FAIL" },
                duration(row.rto_seconds),
                duration(row.rpo_seconds),
                row.backup,
                row.kept_in.join(",")
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
