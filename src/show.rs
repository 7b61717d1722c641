//! `lifeboat show BACKUP`: one manifest, readable (or as JSON).

use std::fmt;

use serde::Serialize;

use crate::config::Config;
use crate::error::{Error, ErrorKind, Result};
use crate::human::human_size;
use crate::manifest::Manifest;
use crate::repository::Repository;

pub struct ShowOptions {
    /// A backup id, or "latest" together with `job`.
    pub backup: String,
    pub job: Option<String>,
    pub from: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct ShowReport {
    pub repository: String,
    pub manifest: Manifest,
    /// The backup is dated ahead of the repositories' clock.
    pub in_the_future: bool,
}

pub async fn run(config: &Config, options: &ShowOptions) -> Result<ShowReport> {
    // Without --from, every repository: a backup only the second one holds (the first was
    // down when it was taken) is shown as well, and `latest` is the newest any holds.
    let repositories = match &options.from {
        Some(from) => vec![Repository::choose(config, Some(from)).await?],
        None => Repository::open_all(config).await,
    };
    let jobs: Vec<&str> = match &options.job {
        Some(job) => vec![config.job(job)?.name.as_str()],
        None => config.jobs.iter().map(|j| j.name.as_str()).collect(),
    };
    if options.backup == "latest" && jobs.len() != 1 {
        return Err(Error::usage("`show latest` needs --job JOB"));
    }
    let mut found: Vec<(&str, String)> = Vec::new();
    let mut failures: Vec<Error> = Vec::new();
    for job in jobs {
        let mut ids = Vec::new();
        for repository in &repositories {
            match repository.resolve_backup(job, &options.backup).await {
                Ok(id) => ids.push(id),
                Err(e) if e.kind() == ErrorKind::NotFound => {}
                Err(e) => failures.push(e),
            }
        }
        // Ids are UTC seconds: the greatest is the newest.
        if let Some(id) = ids.into_iter().max() {
            found.push((job, id));
        }
    }
    let place = match repositories.as_slice() {
        [only] => format!("repository '{}'", only.name),
        _ => "any repository".to_string(),
    };
    match found.as_slice() {
        [(job, id)] => {
            let mut last = None;
            for repository in &repositories {
                match repository.read_manifest(job, id).await {
                    Ok(manifest) => {
                        let now = crate::clock::read(std::slice::from_ref(repository))
                            .await
                            .clock()
                            .now();
                        let dated = manifest.finished_at.max(manifest.recovery_point);
                        return Ok(ShowReport {
                            repository: repository.name.clone(),
                            in_the_future: crate::clock::in_the_future(
                                dated,
                                now,
                                config.max_clock_skew,
                            ),
                            manifest,
                        });
                    }
                    Err(e) => last = Some(e),
                }
            }
            Err(last.expect("a repository listed the backup"))
        }
        [] => match failures.into_iter().next() {
            // Not found where it could be looked for, and a repository could not be read.
            Some(failed) if repositories.len() == 1 => Err(failed),
            failed => {
                let mut error = Error::new(
                    ErrorKind::NotFound,
                    format!("unable to find backup '{}' in {place}", options.backup),
                )
                .with_hint("run `lifeboat list` to see the backups each repository holds");
                if let Some(failed) = failed {
                    error = error.with_hint(format!(
                        "a repository could not be read: {}",
                        failed.chain().join(": ")
                    ));
                }
                Err(error)
            }
        },
        several => Err(Error::usage(format!(
            "backup id '{}' exists for several jobs ({}); add --job JOB",
            options.backup,
            several
                .iter()
                .map(|(job, _)| *job)
                .collect::<Vec<_>>()
                .join(", ")
        ))),
    }
}

impl fmt::Display for ShowReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = &self.manifest;
        writeln!(f, "backup          {}/{}", m.job, m.id)?;
        writeln!(f, "kind            {}", m.kind)?;
        writeln!(f, "repository      {}", self.repository)?;
        writeln!(f, "started         {}", m.started_at.to_rfc3339())?;
        writeln!(f, "finished        {}", m.finished_at.to_rfc3339())?;
        writeln!(f, "recovery point  {}", m.recovery_point.to_rfc3339())?;
        writeln!(f, "host            {}", m.host)?;
        if self.in_the_future {
            writeln!(
                f,
                "warning         dated in the future: host '{}' had a clock running fast (or a repository's clock stepped back), so this backup sorts as newer than backups made since",
                m.host
            )?;
        }
        writeln!(f, "lifeboat        {}", m.tool_version)?;
        if let Some(version) = &m.source.server_version {
            let server = if m.kind.starts_with("redis") {
                "Redis"
            } else if m.kind.starts_with("postgres") {
                "PostgreSQL"
            } else {
                "version"
            };
            writeln!(f, "server          {server} {version}")?;
        }
        if let Some(identifier) = &m.source.system_identifier {
            writeln!(f, "system id       {identifier}")?;
        }
        if !m.source.databases.is_empty() {
            writeln!(f, "databases       {}", m.source.databases.join(", "))?;
        }
        if !m.source.paths.is_empty() {
            writeln!(f, "paths           {}", m.source.paths.join(", "))?;
        }
        if let Some(entries) = m.source.entries {
            writeln!(f, "entries         {entries}")?;
        }
        if let Some(count) = m.source.not_stored {
            writeln!(
                f,
                "not stored      {}",
                crate::manifest::describe_not_stored(count, &m.source.not_stored_entries)
            )?;
        }
        for note in crate::manifest::source_notes(&m.source) {
            writeln!(f, "note            {note}")?;
        }
        writeln!(
            f,
            "size            {} stored, {} raw",
            human_size(m.stored_size()),
            human_size(m.raw_size())
        )?;
        writeln!(f, "objects")?;
        for object in &m.objects {
            writeln!(
                f,
                "  {}  {} stored ({}), {} raw",
                object.name,
                human_size(object.size),
                object.compression,
                human_size(object.raw_size)
            )?;
            writeln!(f, "    sha256      {}", object.sha256)?;
            writeln!(f, "    raw_sha256  {}", object.raw_sha256)?;
        }
        Ok(())
    }
}
