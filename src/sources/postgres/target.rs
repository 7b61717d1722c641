//! The server a restore writes into: one session kept for the whole restore, for the
//! questions and changes around pg_restore (which databases exist, creating one, dropping
//! one that lifeboat created when its restore fails).

use super::{Connection, quote_identifier};
use crate::error::{Error, ErrorKind, Result};

/// A session connected to a database, as pg_stat_activity shows it.
#[derive(Debug, Clone)]
pub struct Session {
    pub pid: i32,
    pub user: String,
    pub application: String,
    pub state: String,
    /// When its open transaction began; empty when it has none.
    pub transaction_since: String,
}

impl std::fmt::Display for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "pid {} (user '{}'", self.pid, self.user)?;
        if !self.application.is_empty() {
            write!(f, ", application '{}'", self.application)?;
        }
        if !self.state.is_empty() {
            write!(f, ", {}", self.state)?;
        }
        if !self.transaction_since.is_empty() {
            write!(f, ", in a transaction since {}", self.transaction_since)?;
        }
        write!(f, ")")
    }
}

pub struct Target {
    connection: Connection,
    client: tokio_postgres::Client,
}

fn query_error(connection: &Connection, what: &str, err: tokio_postgres::Error) -> Error {
    Error::new(
        ErrorKind::Source,
        format!("unable to {what} on {}", connection.describe()),
    )
    .with_source(err)
}

impl Target {
    pub async fn open(connection: &Connection) -> Result<Target> {
        Ok(Target {
            client: connection.connect().await?,
            connection: connection.clone(),
        })
    }

    pub async fn server_major(&self) -> Result<u32> {
        let row = self
            .client
            .query_one("select current_setting('server_version_num')::int", &[])
            .await
            .map_err(|e| query_error(&self.connection, "read the server version", e))?;
        Ok((row.get::<_, i32>(0) / 10_000) as u32)
    }

    pub async fn database_exists(&self, database: &str) -> Result<bool> {
        let row = self
            .client
            .query_opt("select 1 from pg_database where datname = $1", &[&database])
            .await
            .map_err(|e| query_error(&self.connection, "look up databases", e))?;
        Ok(row.is_some())
    }

    /// What `database` holds that someone made, as phrases ("3 relations (tables, views,
    /// sequences, indexes)", "1 large objects"); empty for a database as `CREATE DATABASE`
    /// leaves it. Everything initdb made has an oid below 16384 (FirstNormalObjectId), so
    /// every object of these kinds at or above it was made since. A comment, the owner and
    /// the database's privileges do not count: `postgres` has a comment from initdb, and
    /// the restore sets the source's.
    pub async fn database_contents(&self, database: &str) -> Result<Vec<String>> {
        const KINDS: &[(&str, &str)] = &[
            ("pg_class", "relations (tables, views, sequences, indexes)"),
            ("pg_proc", "functions or procedures"),
            ("pg_type", "types"),
            ("pg_namespace", "schemas"),
            ("pg_largeobject_metadata", "large objects"),
            ("pg_extension", "extensions"),
            ("pg_operator", "operators"),
            ("pg_opclass", "operator classes"),
            ("pg_opfamily", "operator families"),
            ("pg_collation", "collations"),
            ("pg_conversion", "conversions"),
            ("pg_cast", "casts"),
            ("pg_ts_config", "text search configurations"),
            ("pg_ts_dict", "text search dictionaries"),
            ("pg_ts_parser", "text search parsers"),
            ("pg_ts_template", "text search templates"),
            ("pg_am", "access methods"),
            ("pg_language", "languages"),
            ("pg_foreign_data_wrapper", "foreign data wrappers"),
            ("pg_foreign_server", "foreign servers"),
            ("pg_default_acl", "default privileges"),
            ("pg_publication", "publications"),
            ("pg_event_trigger", "event triggers"),
            ("pg_transform", "transforms"),
            ("pg_statistic_ext", "extended statistics"),
        ];
        let other = self.connection.with_database(database);
        let client = other.connect().await?;
        let counts: Vec<String> = KINDS
            .iter()
            .map(|(catalog, _)| {
                let made = match *catalog {
                    // Any oid: a large object's is the caller's choice.
                    "pg_largeobject_metadata" => "true",
                    // The schemas of temporary tables outlive their sessions.
                    "pg_namespace" => "oid >= 16384 and nspname !~ '^pg_(toast_)?temp_'",
                    _ => "oid >= 16384",
                };
                format!("(select count(*) from pg_catalog.{catalog} where {made})")
            })
            .collect();
        let row = client
            .query_one(
                &format!(
                    "select {}, (select count(*) from pg_catalog.pg_db_role_setting s \
                       join pg_catalog.pg_database d on d.oid = s.setdatabase \
                       where d.datname = pg_catalog.current_database())",
                    counts.join(", ")
                ),
                &[],
            )
            .await
            .map_err(|e| query_error(&other, "look for what the database holds", e))?;
        Ok(KINDS
            .iter()
            .map(|(_, kind)| *kind)
            .chain(["settings (ALTER DATABASE/ROLE ... SET)"])
            .enumerate()
            .filter_map(|(index, kind)| {
                let count = row.get::<_, i64>(index);
                (count > 0).then(|| format!("{count} {kind}"))
            })
            .collect())
    }

    /// The roles of the server that may log in.
    pub async fn login_role_names(&self) -> Result<std::collections::BTreeSet<String>> {
        let rows = self
            .client
            .query("select rolname::text from pg_roles where rolcanlogin", &[])
            .await
            .map_err(|e| query_error(&self.connection, "list roles", e))?;
        Ok(rows.iter().map(|row| row.get::<_, String>(0)).collect())
    }

    /// Every role the server has.
    pub async fn role_names(&self) -> Result<std::collections::BTreeSet<String>> {
        let rows = self
            .client
            .query("select rolname::text from pg_roles", &[])
            .await
            .map_err(|e| query_error(&self.connection, "list roles", e))?;
        Ok(rows.iter().map(|row| row.get::<_, String>(0)).collect())
    }

    /// Runs one statement that needs no result (a `CREATE DATABASE`, which cannot run in a
    /// transaction block with others).
    pub async fn execute(&self, sql: &str) -> std::result::Result<(), tokio_postgres::Error> {
        self.client.batch_execute(sql).await
    }

    /// The sessions connected to `database`, but this one.
    pub async fn sessions_on(&self, database: &str) -> Result<Vec<Session>> {
        let rows = self
            .client
            .query(
                "select pid, coalesce(usename::text, ''), coalesce(application_name, ''), \
                 coalesce(state, ''), coalesce(to_char(xact_start, 'YYYY-MM-DD HH24:MI:SS TZ'), '') \
                 from pg_stat_activity where datname = $1 and pid <> pg_backend_pid() order by pid",
                &[&database],
            )
            .await
            .map_err(|e| query_error(&self.connection, "list sessions", e))?;
        Ok(rows
            .iter()
            .map(|row| Session {
                pid: row.get(0),
                user: row.get(1),
                application: row.get(2),
                state: row.get(3),
                transaction_since: row.get(4),
            })
            .collect())
    }

    /// Ends the sessions connected to `database` (pg_terminate_backend), but this one.
    pub async fn terminate_sessions(&self, database: &str) -> Result<()> {
        self.client
            .execute(
                "select pg_terminate_backend(pid) from pg_stat_activity \
                 where datname = $1 and pid <> pg_backend_pid()",
                &[&database],
            )
            .await
            .map(|_| ())
            .map_err(|e| {
                query_error(
                    &self.connection,
                    &format!("end the sessions on '{database}'"),
                    e,
                )
            })
    }

    /// The size of `database` on disk (`pg_database_size`).
    pub async fn database_size(&self, database: &str) -> Result<u64> {
        let row = self
            .client
            .query_one("select pg_database_size($1::text)", &[&database])
            .await
            .map_err(|e| {
                query_error(
                    &self.connection,
                    &format!("read the size of '{database}'"),
                    e,
                )
            })?;
        Ok(row.get::<_, i64>(0).max(0) as u64)
    }

    /// The server's data directory, when this role may read it (superusers and
    /// pg_read_all_settings).
    pub async fn data_directory(&self) -> Option<String> {
        self.client
            .query_one(
                "select setting from pg_settings where name = 'data_directory'",
                &[],
            )
            .await
            .ok()
            .map(|row| row.get::<_, String>(0))
            .filter(|dir| !dir.is_empty())
    }

    /// Databases whose comment starts with `prefix`: name, comment, oid.
    pub async fn databases_commented(&self, prefix: &str) -> Result<Vec<(String, String, u32)>> {
        let rows = self
            .client
            .query(
                "select datname::text, shobj_description(oid, 'pg_database'), oid from pg_database \
                 where starts_with(coalesce(shobj_description(oid, 'pg_database'), ''), $1) order by 1",
                &[&prefix],
            )
            .await
            .map_err(|e| query_error(&self.connection, "list databases", e))?;
        Ok(rows
            .iter()
            .map(|row| (row.get(0), row.get(1), row.get(2)))
            .collect())
    }

    /// Every table of `database` (ordinary tables and partitions, not their parents) with
    /// its exact row count, counted in one read-only transaction.
    pub async fn table_rows(&self, database: &str) -> Result<Vec<(String, i64)>> {
        let other = self.connection.with_database(database);
        let client = other.connect().await?;
        let failed = |e| query_error(&other, "count the restored rows", e);
        client
            .batch_execute("begin transaction isolation level repeatable read read only")
            .await
            .map_err(failed)?;
        let tables = client
            .query(
                "select format('%I.%I', n.nspname, c.relname) from pg_class c \
                 join pg_namespace n on n.oid = c.relnamespace where c.relkind = 'r' \
                 and n.nspname not in ('pg_catalog', 'information_schema') \
                 and n.nspname not like 'pg\\_toast%' order by 1",
                &[],
            )
            .await
            .map_err(failed)?;
        let mut counted = Vec::new();
        for table in tables {
            let name: String = table.get(0);
            let row = client
                .query_one(&format!("select count(*) from {name}"), &[])
                .await
                .map_err(failed)?;
            counted.push((name, row.get::<_, i64>(0)));
        }
        let _ = client.batch_execute("commit").await;
        Ok(counted)
    }

    /// Runs `statements` then every `(from, to)` rename, in order, in one transaction: all
    /// or none. A lock is waited for 1 s at most and the whole 3 s (PostgreSQL waits 5 s
    /// for the sessions on a database being renamed to end); and the server drops it if
    /// this client goes away meanwhile (PostgreSQL 14 and newer).
    pub async fn swap(
        &self,
        statements: &[String],
        renames: &[(String, String)],
    ) -> std::result::Result<(), tokio_postgres::Error> {
        // Older servers lack the setting; they notice a dead client when they next write.
        let _ = self
            .client
            .batch_execute("set client_connection_check_interval = '100ms'")
            .await;
        let mut sql =
            "begin; set local lock_timeout = '1s'; set local statement_timeout = '3s';".to_string();
        for statement in statements {
            sql.push(' ');
            sql.push_str(statement);
            sql.push(';');
        }
        for (from, to) in renames {
            sql.push_str(&format!(
                " alter database {} rename to {};",
                quote_identifier(from),
                quote_identifier(to)
            ));
        }
        sql.push_str(" commit;");
        let outcome = self.client.batch_execute(&sql).await;
        if outcome.is_err() {
            let _ = self.client.batch_execute("rollback").await;
        }
        outcome
    }

    /// The oid of `database`.
    pub async fn database_oid(&self, database: &str) -> Result<u32> {
        let row = self
            .client
            .query_one(
                "select oid from pg_database where datname = $1",
                &[&database],
            )
            .await
            .map_err(|e| query_error(&self.connection, "look up databases", e))?;
        Ok(row.get::<_, u32>(0))
    }

    pub async fn drop_database(&self, database: &str) -> Result<()> {
        let sql = format!(
            "drop database if exists {} with (force)",
            quote_identifier(database)
        );
        self.client
            .batch_execute(&sql)
            .await
            .map_err(|e| query_error(&self.connection, &format!("drop database '{database}'"), e))
    }

    /// The server's system identifier (from its control file); None when this role may not
    /// read it (`pg_control_system()` is for superusers and pg_monitor).
    pub async fn system_identifier(&self) -> Option<String> {
        self.client
            .query_one(
                "select system_identifier::text from pg_control_system()",
                &[],
            )
            .await
            .ok()
            .map(|row| row.get::<_, String>(0))
    }

    /// The first column of the one row `sql` returns, as PostgreSQL prints it; None for no
    /// row or NULL; an error for several rows, since which one would answer the check is
    /// anyone's guess. For drill checks, which compare what an operator would see in psql.
    /// `sql` must be one statement (it is parsed first, without running, and several are
    /// refused); it runs in a read-only transaction that has already run a query (so it
    /// cannot be turned read-write), in a session whose transactions are all read-only, and
    /// is rolled back after: a check reads, it never changes what it checks.
    pub async fn first_value(&self, sql: &str) -> Result<Option<String>> {
        self.client
            .prepare(sql)
            .await
            .map_err(|e| query_error(&self.connection, &format!("run `{sql}`"), e))?;
        self.client
            .batch_execute(
                "set default_transaction_read_only = on; begin transaction read only; select 1",
            )
            .await
            .map_err(|e| query_error(&self.connection, "start a read-only transaction", e))?;
        let outcome = self.client.simple_query(sql).await;
        let _ = self.client.batch_execute("rollback").await;
        let messages =
            outcome.map_err(|e| query_error(&self.connection, &format!("run `{sql}`"), e))?;
        let rows: Vec<Option<String>> = messages
            .into_iter()
            .filter_map(|message| match message {
                tokio_postgres::SimpleQueryMessage::Row(row) => {
                    Some(row.get(0).map(str::to_string))
                }
                _ => None,
            })
            .collect();
        if rows.len() > 1 {
            return Err(Error::new(
                ErrorKind::Verification,
                format!(
                    "`{sql}` returned {} rows, and a check compares one value",
                    rows.len()
                ),
            )
            .with_hint(
                "make it return one row: an aggregate (count, max), a narrower WHERE, or LIMIT 1",
            ));
        }
        Ok(rows.into_iter().next().flatten())
    }
}
