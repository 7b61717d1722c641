//! PostgreSQL: how lifeboat reaches a server (its own connection with tokio-postgres, and
//! the client binaries it runs), and what it asks of it. The only module that knows
//! tokio-postgres.
//!
//! Passwords come from `password_file`, PGPASSWORD or a passfile, in that order. lifeboat
//! uses the password for its own connection and hands it to child processes through a
//! private temporary passfile (PGPASSFILE), never through argv or a log line.

pub mod archive;
mod binaries;
mod connection;
pub mod logical;
pub mod physical;
mod scratch;
mod target;
mod tls;

pub use binaries::Binaries;
pub use connection::{ChildAuth, Connection};
pub use scratch::{ScratchCluster, ScratchDir};
pub use target::{Session, Target};

/// "unable to {what} on user@host:port/db", caused by the server's error.
pub(crate) fn query_error(
    connection: &Connection,
    what: &str,
    err: tokio_postgres::Error,
) -> crate::error::Error {
    crate::error::Error::new(
        crate::error::ErrorKind::Source,
        format!("unable to {what} on {}", connection.describe()),
    )
    .with_source(err)
}

/// Quotes an SQL identifier: `"name"`, with inner quotes doubled.
pub fn quote_identifier(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

#[cfg(test)]
mod tests {
    #[test]
    fn identifiers_are_quoted() {
        assert_eq!(super::quote_identifier("app"), "\"app\"");
        assert_eq!(super::quote_identifier("we\"ird"), "\"we\"\"ird\"");
    }
}
