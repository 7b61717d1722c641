//! A `files` job: one tar stream of the configured paths.

use chrono::Utc;

use super::{Captured, Context};
use crate::config::FilesJob;
use crate::error::Result;
use crate::manifest::SourceInfo;
use crate::sources::files;

use crate::layout::FILES_OBJECT;

pub(super) async fn capture(context: &Context<'_>, job: &FilesJob) -> Result<Captured> {
    // Files are read over the run; every one is at least as new as this moment.
    let started_at = Utc::now();
    let job_name = context.job_name.to_string();
    let paths = job.paths.iter().map(|p| p.display().to_string()).collect();
    let owned_job = job.clone();
    let (entry, summary) = context
        .store(FILES_OBJECT, move |out| {
            files::write_archive(&job_name, &owned_job, out)
        })
        .await?;
    let notes = summary.notes.clone();
    Ok(Captured {
        objects: vec![entry],
        source: SourceInfo {
            paths,
            entries: Some(summary.entries),
            not_stored: (summary.not_stored > 0).then_some(summary.not_stored),
            not_stored_entries: summary.not_stored_entries,
            ..SourceInfo::default()
        },
        recovery_point: Some(started_at),
        notes,
    })
}
