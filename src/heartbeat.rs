//! `lifeboat heartbeat JOB`: upserts the job's row in `lifeboat.heartbeat` on its server.
//! For physical jobs a timer runs it every minute: the newest heartbeat a restore recovers
//! is how much data the WAL archive would have lost.

use chrono::{DateTime, Utc};

use crate::config::{Config, JobSource};
use crate::error::{Error, Result};
use crate::sources::postgres::{Connection, logical};

pub async fn run(config: &Config, job: &str) -> Result<DateTime<Utc>> {
    let job = config.job(job)?;
    let JobSource::Postgres(postgres) = &job.source else {
        return Err(Error::usage(format!(
            "job '{}' is a {} job; heartbeats are written to PostgreSQL servers",
            job.name,
            job.kind_name()
        )));
    };
    let server = Connection::from_settings(&format!("job '{}'", job.name), &postgres.connection)?;
    logical::write_heartbeat(&server, &job.name).await
}
