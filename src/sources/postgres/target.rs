//! The server a restore writes into: one session kept for the whole restore, for the
//! questions and changes around pg_restore (which databases exist, creating one, dropping
//! one that lifeboat created when its restore fails).

use super::{Connection, quote_identifier};
use crate::error::{Error, ErrorKind, Result};

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

    /// Whether `database` holds no table, view, sequence or index outside the system schemas.
    pub async fn database_is_empty(&self, database: &str) -> Result<bool> {
        let other = self.connection.with_database(database);
        let client = other.connect().await?;
        let row = client
            .query_one(
                "select count(*) from pg_class c join pg_namespace n on n.oid = c.relnamespace \
                 where n.nspname not in ('pg_catalog', 'information_schema') \
                 and n.nspname not like 'pg\\_toast%' and n.nspname not like 'pg\\_temp%'",
                &[],
            )
            .await
            .map_err(|e| query_error(&other, "look for existing tables", e))?;
        Ok(row.get::<_, i64>(0) == 0)
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

    pub async fn create_database(&self, database: &str) -> Result<()> {
        let sql = format!(
            "create database {} template template0",
            quote_identifier(database)
        );
        self.client.batch_execute(&sql).await.map_err(|e| {
            query_error(
                &self.connection,
                &format!("create database '{database}'"),
                e,
            )
        })
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

    /// The first column of the first row `sql` returns, as PostgreSQL prints it; None for
    /// no row or NULL. For drill checks, which compare what an operator would see in psql.
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
        Ok(messages
            .into_iter()
            .find_map(|message| match message {
                tokio_postgres::SimpleQueryMessage::Row(row) => {
                    Some(row.get(0).map(str::to_string))
                }
                _ => None,
            })
            .flatten())
    }
}
