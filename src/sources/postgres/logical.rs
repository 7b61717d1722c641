//! What a logical backup asks of the server: its identity, its databases, a heartbeat row,
//! and an exported snapshot per database that pg_dump then reads, so the recovery point is
//! the moment that snapshot was taken, not when the dump finished.

use std::process::Command;

use chrono::{DateTime, Utc};

use super::{Binaries, ChildAuth, Connection, query_error};
use crate::error::{Error, ErrorKind, Result};

#[derive(Debug, Clone)]
pub struct ServerInfo {
    pub version: String,
    pub major: u32,
    pub system_identifier: Option<String>,
    pub is_superuser: bool,
}

/// What a server has to back up: the databases the backup role can dump, and those it
/// cannot, with why (templates are not databases to back up).
#[derive(Debug, Clone, Default)]
pub struct Databases {
    pub dumpable: Vec<String>,
    pub skipped: Vec<crate::manifest::SkippedDatabase>,
}

/// Version, identity and databases (see `Databases`).
pub async fn discover(connection: &Connection) -> Result<(ServerInfo, Databases)> {
    let client = connection.connect().await?;
    let row = client
        .query_one(
            "select current_setting('server_version'), current_setting('server_version_num')::int, \
             (select rolsuper from pg_roles where rolname = current_user)",
            &[],
        )
        .await
        .map_err(|e| query_error(connection, "read the server version", e))?;
    let version: String = row.get(0);
    let version_num: i32 = row.get(1);
    let is_superuser: bool = row.get::<_, Option<bool>>(2).unwrap_or(false);
    // pg_control_system() is for superusers and pg_monitor members; without it the manifest
    // simply has no system identifier.
    let system_identifier = client
        .query_one(
            "select system_identifier::text from pg_control_system()",
            &[],
        )
        .await
        .ok()
        .map(|row| row.get::<_, String>(0));
    let rows = client
        .query(
            "select datname::text, datallowconn, datconnlimit, has_database_privilege(oid, 'CONNECT') \
             from pg_database where not datistemplate order by datname",
            &[],
        )
        .await
        .map_err(|e| query_error(connection, "list databases", e))?;
    let mut databases = Databases::default();
    for row in rows {
        let name: String = row.get(0);
        // Superusers pass connection limits and CONNECT privileges; nobody passes
        // ALLOW_CONNECTIONS false, pg_dump included.
        let reason = if !row.get::<_, bool>(1) {
            Some("it does not accept connections (ALLOW_CONNECTIONS false)")
        } else if !is_superuser && row.get::<_, i32>(2) == 0 {
            Some("its connection limit is 0 and the backup role is not a superuser")
        } else if !is_superuser && row.get::<_, i32>(2) == 1 {
            Some(
                "its connection limit is 1, a dump needs two connections (lifeboat's snapshot and pg_dump), and the backup role is not a superuser",
            )
        } else if !row.get::<_, bool>(3) {
            Some("the backup role lacks the CONNECT privilege on it")
        } else {
            None
        };
        match reason {
            Some(reason) => databases.skipped.push(crate::manifest::SkippedDatabase {
                name,
                reason: reason.to_string(),
            }),
            None => databases.dumpable.push(name),
        }
    }
    Ok((
        ServerInfo {
            version,
            major: (version_num / 10_000) as u32,
            system_identifier,
            is_superuser,
        },
        databases,
    ))
}

/// Upserts `lifeboat.heartbeat(job, at)` so a restored database can tell how fresh it is.
/// How long ago the job's heartbeat row was last written, by the server's clock; None when
/// there is no row (or no table) yet. For `check`: a physical job's heartbeat timer runs.
pub async fn heartbeat_age(connection: &Connection, job: &str) -> Result<Option<f64>> {
    let client = connection.connect().await?;
    // Read only from a table of this role or a superuser: a view, or a table another role
    // owns, could run that role's code as ours.
    let found = client
        .query_opt(
            "select c.relkind::text, \
                    (select r.rolsuper or r.rolname = current_user from pg_catalog.pg_roles r where r.oid = c.relowner) \
             from pg_catalog.pg_class c join pg_catalog.pg_namespace n on n.oid = c.relnamespace \
             where n.nspname = 'lifeboat' and c.relname = 'heartbeat'",
            &[],
        )
        .await
        .map_err(|e| query_error(connection, "look for the table lifeboat.heartbeat", e))?;
    let Some(found) = found else {
        return Ok(None);
    };
    let (kind, trusted): (String, bool) = (found.get(0), found.get(1));
    if kind != "r" || !trusted {
        return Err(Error::new(
            ErrorKind::Source,
            format!(
                "{}: lifeboat.heartbeat is not a table of this role or a superuser; heartbeats refuse it too",
                connection.describe()
            ),
        ));
    }
    let row = client
        .query_opt(
            "select extract(epoch from (pg_catalog.now() - at))::float8 \
             from lifeboat.heartbeat where job = $1",
            &[&job],
        )
        .await
        .map_err(|e| query_error(connection, "read lifeboat.heartbeat", e))?;
    Ok(row.map(|row| row.get(0)))
}

pub async fn write_heartbeat(connection: &Connection, job: &str) -> Result<DateTime<Utc>> {
    let client = connection.connect().await?;
    // The database may belong to anyone who could create it: nothing in it is looked up by
    // an unqualified name (a function in a schema of theirs first on search_path).
    client
        .batch_execute(
            "set search_path = pg_catalog, pg_temp; \
             create schema if not exists lifeboat; \
             create table if not exists lifeboat.heartbeat (job text primary key, at timestamptz not null)",
        )
        .await
        .map_err(|e| {
            query_error(connection, "create the table lifeboat.heartbeat", e)
                .with_hint("grant the backup role CREATE on the database, or set heartbeat = false")
        })?;
    // A schema or table another role made first could hold a trigger, a rule or a default
    // that would run that role's code as the backup role, often a superuser.
    let row = client
        .query_one(
            "select n.nspowner::regrole::text, \
                    (select r.rolsuper or r.rolname = current_user from pg_roles r where r.oid = n.nspowner), \
                    c.relowner::regrole::text, \
                    (select r.rolsuper or r.rolname = current_user from pg_roles r where r.oid = c.relowner), \
                    c.relkind::text, \
                    (select count(*) from pg_trigger t where t.tgrelid = c.oid and not t.tgisinternal) \
                      + (select count(*) from pg_rewrite w where w.ev_class = c.oid) \
             from pg_class c join pg_namespace n on n.oid = c.relnamespace \
             where n.nspname = 'lifeboat' and c.relname = 'heartbeat'",
            &[],
        )
        .await
        .map_err(|e| query_error(connection, "check the table lifeboat.heartbeat", e))?;
    let (schema_owner, schema_trusted): (String, bool) = (row.get(0), row.get(1));
    let (table_owner, table_trusted): (String, bool) = (row.get(2), row.get(3));
    let (kind, hooks): (String, i64) = (row.get(4), row.get(5));
    let problem = if !schema_trusted {
        Some(format!(
            "the schema lifeboat belongs to role '{schema_owner}'"
        ))
    } else if !table_trusted {
        Some(format!(
            "the table lifeboat.heartbeat belongs to role '{table_owner}'"
        ))
    } else if kind != "r" {
        Some("lifeboat.heartbeat is not a plain table".to_string())
    } else if hooks > 0 {
        Some("lifeboat.heartbeat has triggers or rules".to_string())
    } else {
        None
    };
    if let Some(problem) = problem {
        return Err(Error::new(
            ErrorKind::Source,
            format!(
                "refusing to write the heartbeat on {}: {problem}, not the backup role or a superuser; another role's code there would run as the backup role",
                connection.describe()
            ),
        )
        .with_hint("drop the schema lifeboat in that database (it holds only the heartbeat; lifeboat makes it again), or set heartbeat = false"));
    }
    let row = client
        .query_one(
            "insert into lifeboat.heartbeat (job, at) values ($1, pg_catalog.now()) \
             on conflict (job) do update set at = excluded.at returning at",
            &[&job],
        )
        .await
        .map_err(|e| query_error(connection, "write the heartbeat row", e))?;
    Ok(row.get(0))
}

/// A snapshot exported from an open repeatable-read transaction; it stays importable
/// until this value is finished or dropped.
pub struct Snapshot {
    client: tokio_postgres::Client,
    pub id: String,
    /// When the snapshot was taken: every transaction committed before it is in the dump.
    pub taken_at: DateTime<Utc>,
}

pub async fn export_snapshot(connection: &Connection) -> Result<Snapshot> {
    let client = connection.connect().await?;
    client
        .batch_execute("begin isolation level repeatable read read only")
        .await
        .map_err(|e| query_error(connection, "start the snapshot transaction", e))?;
    // The snapshot is taken at the start of this first statement, after its timestamp.
    let row = client
        .query_one("select pg_export_snapshot(), statement_timestamp()", &[])
        .await
        .map_err(|e| query_error(connection, "export a snapshot", e))?;
    Ok(Snapshot {
        id: row.get(0),
        taken_at: row.get(1),
        client,
    })
}

impl Snapshot {
    pub async fn finish(self) {
        let _ = self.client.batch_execute("commit").await;
    }
}

/// `pg_dump --format=custom --compress=0` of one database, reading `snapshot`.
pub fn dump_command(
    binaries: &Binaries,
    connection: &Connection,
    snapshot: &str,
    auth: &ChildAuth,
) -> Command {
    let mut command = binaries.command("pg_dump");
    command
        .arg("--format=custom")
        .arg("--compress=0")
        .arg(format!("--snapshot={snapshot}"))
        .arg("--no-password")
        .arg(format!("--dbname={}", connection.conninfo()));
    auth.apply(&mut command);
    command
}

/// `pg_dumpall --globals-only`: roles and tablespaces. Role passwords are only readable by
/// superusers; other roles get the globals without them, and a warning.
pub fn globals_command(
    binaries: &Binaries,
    connection: &Connection,
    server: &ServerInfo,
    auth: &ChildAuth,
) -> Command {
    let mut command = binaries.command("pg_dumpall");
    command.arg("--globals-only").arg("--no-password");
    if !server.is_superuser {
        tracing::warn!(
            "the backup role is not a superuser: globals are dumped without role passwords"
        );
        command.arg("--no-role-passwords");
    }
    command.arg(format!("--dbname={}", connection.conninfo()));
    auth.apply(&mut command);
    command
}
