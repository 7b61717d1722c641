//! A logical `postgres` job: per database, an exported snapshot and a pg_dump of it; then
//! the globals. One object each, all under one manifest.

use chrono::{DateTime, Utc};

use super::{Captured, Context};
use crate::config::PostgresJob;
use crate::error::{Error, ErrorKind, Result};
use crate::layout::{GLOBALS_OBJECT, database_object_name};
use crate::manifest::SourceInfo;
use crate::sources::postgres::{Binaries, Connection, logical};
use crate::sources::process;

pub(super) async fn capture(context: &Context<'_>, job: &PostgresJob) -> Result<Captured> {
    let what = format!("job '{}'", context.job_name);
    let server = Connection::from_settings(&what, &job.connection)?;
    let (info, found) = logical::discover(&server).await?;
    let all_databases = found.dumpable;
    let mut skipped = found.skipped;
    let databases = match &job.databases {
        None => all_databases,
        Some(wanted) => {
            if let Some(refused) = skipped.iter().find(|s| wanted.contains(&s.name)) {
                return Err(Error::new(
                    ErrorKind::Source,
                    format!(
                        "unable to back up database '{}' of {what}: {}",
                        refused.name, refused.reason
                    ),
                )
                .with_hint("back up as a superuser, or allow the backup role to connect to it"));
            }
            // Those not asked for were not skipped: they are not this job's.
            skipped.clear();
            if let Some(missing) = wanted.iter().find(|d| !all_databases.contains(d)) {
                return Err(Error::new(
                    ErrorKind::Source,
                    format!(
                        "unable to back up database '{missing}' of {what}: it does not exist on {}",
                        server.describe()
                    ),
                )
                .with_hint(format!("databases there: {}", all_databases.join(", "))));
            }
            wanted.clone()
        }
    };
    for database in &skipped {
        tracing::warn!(database = %database.name, "not backed up: {}", database.reason);
    }
    let binaries = Binaries::find(job.bin_dir.as_deref(), info.major)?;
    let auth = server.child_auth()?;
    tracing::info!(server = %server.describe(), version = %info.version, pg_dump = %binaries.dir.display(), "dumping {} database(s)", databases.len());

    // The globals are dumped beside the databases, not after them: pg_dumpall's start and
    // its connection cost as much as a small database's dump. Both run to their end, so a
    // failure of one never abandons the other's upload midway.
    let dump_databases = async {
        let mut objects = Vec::new();
        let mut recovery_point: Option<DateTime<Utc>> = None;
        for database in &databases {
            let connection = server.with_database(database);
            if job.heartbeat {
                logical::write_heartbeat(&connection, context.job_name).await?;
            }
            let snapshot = logical::export_snapshot(&connection).await?;
            let command = logical::dump_command(&binaries, &connection, &snapshot.id, &auth);
            let action = format!("dump database '{database}' with pg_dump");
            let name = database_object_name(database);
            let stored = context
                .store(&name, move |out| {
                    process::stream_stdout(command, &action, out)
                })
                .await;
            let taken_at = snapshot.taken_at;
            snapshot.finish().await;
            let (mut entry, _) = stored.map_err(|e| with_privilege_hints(e, server.user()))?;
            // The backup as a whole holds data at least as new as its oldest snapshot.
            recovery_point = Some(recovery_point.map_or(taken_at, |point| point.min(taken_at)));
            entry.database = Some(database.clone());
            objects.push(entry);
        }
        Ok::<_, Error>((objects, recovery_point))
    };
    let globals = logical::globals_command(&binaries, &server, &info, &auth);
    let dump_globals = context.store(GLOBALS_OBJECT, move |out| {
        process::stream_stdout(
            globals,
            "dump globals (roles, tablespaces) with pg_dumpall",
            out,
        )
    });
    let (databases_dumped, globals_dumped) = tokio::join!(dump_databases, dump_globals);
    let (mut objects, recovery_point) = databases_dumped?;
    objects.push(globals_dumped?.0);

    Ok(Captured {
        objects,
        source: SourceInfo {
            server_version: Some(info.version),
            system_identifier: info.system_identifier,
            databases,
            skipped_databases: skipped,
            without_role_passwords: !info.is_superuser,
            ..SourceInfo::default()
        },
        recovery_point,
        notes: Vec::new(),
    })
}

/// pg_dump's permission failures, with the grant that mends each.
fn with_privilege_hints(err: Error, role: &str) -> Error {
    let said = err.chain().join("\n");
    if said.contains("permission denied for large object") {
        return err.with_hint(format!(
            "pg_read_all_data does not cover large objects: grant '{role}' SELECT on each (GRANT SELECT ON LARGE OBJECT oid TO {role}), set lo_compat_privileges = on on the server, or back up as a superuser"
        ));
    }
    if said.contains("permission denied for") {
        return err.with_hint(format!(
            "grant '{role}' read access to everything it dumps: GRANT pg_read_all_data TO {role} (PostgreSQL 14 and newer), or back up as a superuser"
        ));
    }
    err
}

#[cfg(test)]
mod tests {
    use crate::layout::database_object_name;

    #[test]
    fn database_names_become_safe_object_names() {
        assert_eq!(database_object_name("app"), "app.dump.zst");
        assert_eq!(database_object_name("my db/x"), "my%20db%2Fx.dump.zst");
        assert_eq!(database_object_name(".hidden"), "%2Ehidden.dump.zst");
        assert_eq!(database_object_name("café"), "caf%C3%A9.dump.zst");
    }
}
