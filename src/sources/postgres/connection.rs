//! Connection settings: parsed once from the job (or a restore target DSN), with libpq's
//! defaults and environment variables, and rendered for lifeboat's own connection and for
//! child processes.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::str::FromStr;

use tokio_postgres::config::Host;

use super::tls::{self, SslMode, TlsSettings};
use crate::config::PostgresConnection;
use crate::error::{Error, ErrorKind, Result};

#[derive(Clone)]
pub struct Connection {
    config: tokio_postgres::Config,
    password: Option<String>,
    tls: TlsSettings,
    /// Whether sessions look names up in `pg_catalog` (then `pg_temp`) alone, whatever the
    /// database or role sets: lifeboat's own queries run as a privileged role in databases
    /// other roles own, and a function of theirs first on the path would run as that role.
    /// Off only for SQL the user wrote (a drill's checks), which means their schemas.
    safe_search_path: bool,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the password.
        write!(f, "Connection({})", self.describe())
    }
}

/// A private passfile for child processes: an anonymous file in memory (memfd), handed to
/// each child as an open descriptor that libpq reads as `/proc/self/fd/N`. It is never on
/// a disk, so no way lifeboat ends (SIGKILL included) leaves the password behind, and only
/// the children it is applied to hold it.
pub struct ChildAuth {
    passfile: Option<std::os::fd::OwnedFd>,
}

impl ChildAuth {
    /// Another handle on the same passfile, for work that outlives the borrow of this one
    /// (dropping a database when the run is interrupted).
    pub fn try_clone(&self) -> std::io::Result<ChildAuth> {
        Ok(ChildAuth {
            passfile: self
                .passfile
                .as_ref()
                .map(|fd| fd.try_clone())
                .transpose()?,
        })
    }

    /// Points `command` at the passfile and keeps lifeboat's own environment password away
    /// from it.
    pub fn apply(&self, command: &mut Command) {
        use std::os::fd::AsRawFd;
        use std::os::unix::process::CommandExt;
        command.env_remove("PGPASSWORD");
        if let Some(passfile) = &self.passfile {
            let fd = passfile.as_raw_fd();
            command.env("PGPASSFILE", format!("/proc/self/fd/{fd}"));
            // SAFETY: fcntl is async-signal-safe; it clears close-on-exec in the child
            // alone, on a descriptor this ChildAuth keeps open while the child starts.
            unsafe {
                command.pre_exec(move || {
                    if libc::fcntl(fd, libc::F_SETFD, 0) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
    }
}

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

fn os_user() -> Option<String> {
    // SAFETY: getpwuid returns a pointer into static storage or null; we copy the name out
    // before any other call could overwrite it.
    unsafe {
        let entry = libc::getpwuid(libc::geteuid());
        if entry.is_null() {
            return None;
        }
        std::ffi::CStr::from_ptr((*entry).pw_name)
            .to_str()
            .ok()
            .map(str::to_string)
    }
}

/// Runs a connection's I/O until it closes.
async fn drive<S, T>(connection: tokio_postgres::Connection<S, T>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    if let Err(e) = connection.await {
        tracing::debug!(error = %e, "PostgreSQL connection closed");
    }
}

fn config_error(what: &str, message: impl Into<String>) -> Error {
    Error::config(format!("{what}: {}", message.into()))
}

impl Connection {
    /// From a job's settings; `what` names the job's fields in errors ("job 'maindb'").
    pub fn from_settings(what: &str, settings: &PostgresConnection) -> Result<Connection> {
        let (mut config, tls) = match &settings.dsn {
            Some(dsn) => {
                let unparsable = |e: String| {
                    config_error(&format!("{what}: dsn"), format!("unable to parse: {e}"))
                };
                let (rest, tls) = tls::split_dsn(dsn).map_err(unparsable)?;
                let config = tokio_postgres::Config::from_str(&rest)
                    .map_err(|e| unparsable(e.to_string()))?;
                (config, tls)
            }
            None => (tokio_postgres::Config::new(), TlsSettings::default()),
        };
        if let Some(host) = &settings.host {
            config.host(host);
        }
        if let Some(port) = settings.port {
            config.port(port);
        }
        if let Some(user) = &settings.user {
            config.user(user);
        }
        if let Some(dbname) = &settings.dbname {
            config.dbname(dbname);
        }
        let password = match &settings.password_file {
            Some(path) => Some(crate::sources::read_password_file(path)?),
            None => None,
        };
        Connection::complete(config, password, tls)
    }

    /// From a DSN given on the command line (a restore target); the password comes from
    /// PGPASSWORD or a passfile.
    pub fn from_dsn(dsn: &str) -> Result<Connection> {
        let unparsable = |e: String| Error::usage(format!("unable to parse target DSN: {e}"));
        let (rest, tls) = tls::split_dsn(dsn).map_err(unparsable)?;
        let config =
            tokio_postgres::Config::from_str(&rest).map_err(|e| unparsable(e.to_string()))?;
        if config.get_password().is_some() {
            return Err(Error::usage("the target DSN must not contain a password: it would be visible in the process list")
                .with_hint("put the password in PGPASSWORD or a passfile (~/.pgpass)"));
        }
        Connection::complete(config, None, tls)
    }

    /// Fills what libpq would take from the environment or its defaults.
    fn complete(
        mut config: tokio_postgres::Config,
        password: Option<String>,
        mut tls: TlsSettings,
    ) -> Result<Connection> {
        if tls.mode.is_none()
            && let Some(mode) = env("PGSSLMODE")
        {
            tls.mode = Some(SslMode::parse(&mode).ok_or_else(|| {
                Error::config(format!("PGSSLMODE: must be disable, allow, prefer, require, verify-ca or verify-full (got \"{mode}\")"))
            })?);
        }
        if tls.root_cert.is_none() {
            tls.root_cert = env("PGSSLROOTCERT");
        }
        config.ssl_mode(tls.mode().negotiation());
        if config.get_hosts().is_empty() {
            match env("PGHOST") {
                Some(host) => config.host(&host),
                None if Path::new("/var/run/postgresql").is_dir() => {
                    config.host_path("/var/run/postgresql")
                }
                None => config.host("localhost"),
            };
        }
        if config.get_ports().is_empty()
            && let Some(port) = env("PGPORT").and_then(|p| p.parse().ok())
        {
            config.port(port);
        }
        if config.get_user().is_none() {
            let user = env("PGUSER")
                .or_else(os_user)
                .ok_or_else(|| Error::config("no PostgreSQL user given and none could be found"))?;
            config.user(&user);
        }
        if config.get_dbname().is_none() {
            config.dbname(env("PGDATABASE").unwrap_or_else(|| "postgres".to_string()));
        }
        config.application_name("lifeboat");
        let mut connection = Connection {
            config,
            password,
            tls,
            safe_search_path: true,
        };
        if connection.password.is_none() {
            connection.password = env("PGPASSWORD").or_else(|| connection.password_from_passfile());
        }
        Ok(connection)
    }

    pub fn database(&self) -> &str {
        self.config.get_dbname().unwrap_or("postgres")
    }

    fn host_label(&self) -> String {
        match self.config.get_hosts().first() {
            Some(Host::Tcp(host)) => host.clone(),
            Some(Host::Unix(path)) => path.display().to_string(),
            None => "localhost".to_string(),
        }
    }

    /// Whether the server runs on this machine: reached over a Unix socket or a loopback
    /// address, so that its data directory is this machine's to look at.
    pub fn is_local(&self) -> bool {
        match self.config.get_hosts().first() {
            Some(Host::Unix(_)) | None => true,
            Some(Host::Tcp(host)) => {
                host == "localhost"
                    || host
                        .trim_matches(['[', ']'])
                        .parse::<std::net::IpAddr>()
                        .is_ok_and(|ip| ip.is_loopback())
            }
        }
    }

    fn port(&self) -> u16 {
        self.config.get_ports().first().copied().unwrap_or(5432)
    }

    pub fn user(&self) -> &str {
        self.config.get_user().unwrap_or_default()
    }

    /// "user@host:port/dbname", for messages.
    pub fn describe(&self) -> String {
        format!(
            "{}@{}:{}/{}",
            self.user(),
            self.host_label(),
            self.port(),
            self.database()
        )
    }

    /// The same server, another database.
    pub fn with_database(&self, database: &str) -> Connection {
        let mut other = self.clone();
        other.config.dbname(database);
        other
    }

    /// The same, with the search_path the database and role set: for SQL the user wrote.
    pub fn with_users_search_path(&self) -> Connection {
        let mut other = self.clone();
        other.safe_search_path = false;
        other
    }

    pub async fn connect(&self) -> Result<tokio_postgres::Client> {
        let mut config = self.config.clone();
        if self.safe_search_path {
            // A startup option outranks ALTER DATABASE/ROLE ... SET.
            let safe = "-c search_path=pg_catalog,pg_temp";
            let options = match config.get_options() {
                Some(given) if !given.trim().is_empty() => format!("{given} {safe}"),
                _ => safe.to_string(),
            };
            config.options(&options);
        }
        if let Some(password) = &self.password {
            config.password(password);
        }
        let failed = |e: tokio_postgres::Error| {
            let mut err = Error::new(
                ErrorKind::Source,
                format!("unable to connect to PostgreSQL at {}", self.describe()),
            )
            .with_source(e);
            if self.tls.mode().verifies() {
                err = err.with_hint(format!(
                    "sslmode={}: the server's certificate must be signed by a CA in sslrootcert ({}){}",
                    self.tls.mode().as_str(),
                    self.tls.root_cert.as_deref().unwrap_or("~/.postgresql/root.crt"),
                    match self.tls.mode() {
                        SslMode::VerifyFull => " and name the host connected to",
                        _ => "",
                    }
                ));
            }
            err
        };
        // libpq never speaks TLS over a Unix socket, whatever sslmode says.
        let socket = self
            .config
            .get_hosts()
            .iter()
            .all(|host| matches!(host, Host::Unix(_)));
        if self.tls.mode() == SslMode::Disable || socket {
            config.ssl_mode(tokio_postgres::config::SslMode::Disable);
            let (client, connection) = config
                .connect(tokio_postgres::NoTls)
                .await
                .map_err(failed)?;
            tokio::spawn(drive(connection));
            return Ok(client);
        }
        let tls_config = self.tls.client_config().map_err(|problem| {
            Error::config(format!(
                "unable to connect to PostgreSQL at {}: {problem}",
                self.describe()
            ))
        })?;
        let (client, connection) = config
            .connect(tokio_postgres_rustls::MakeRustlsConnect::new(tls_config))
            .await
            .map_err(failed)?;
        tokio::spawn(drive(connection));
        Ok(client)
    }

    /// A libpq connection string for child processes. It never holds the password.
    pub fn conninfo(&self) -> String {
        let mut pairs = vec![
            ("host", self.host_label()),
            ("port", self.port().to_string()),
            ("user", self.user().to_string()),
            ("dbname", self.database().to_string()),
            ("application_name", "lifeboat".to_string()),
        ];
        if let Some(mode) = self.tls.mode {
            pairs.push(("sslmode", mode.as_str().to_string()));
        }
        if let Some(root_cert) = &self.tls.root_cert {
            pairs.push(("sslrootcert", root_cert.clone()));
        }
        if let Some(timeout) = self.config.get_connect_timeout() {
            pairs.push(("connect_timeout", timeout.as_secs().max(1).to_string()));
        }
        pairs
            .into_iter()
            .map(|(key, value)| {
                format!(
                    "{key}='{}'",
                    value.replace('\\', "\\\\").replace('\'', "\\'")
                )
            })
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// A private passfile holding the password, for child processes.
    pub fn child_auth(&self) -> Result<ChildAuth> {
        let Some(password) = &self.password else {
            return Ok(ChildAuth { passfile: None });
        };
        let write = || -> std::io::Result<std::os::fd::OwnedFd> {
            use std::os::fd::FromRawFd;
            // SAFETY: memfd_create with a static name; the descriptor is owned at once.
            let fd = unsafe { libc::memfd_create(c"lifeboat-pgpass".as_ptr(), libc::MFD_CLOEXEC) };
            if fd < 0 {
                return Err(std::io::Error::last_os_error());
            }
            // SAFETY: fd was just created and is owned by nothing else.
            let mut file = unsafe { std::fs::File::from_raw_fd(fd) };
            // libpq ignores a passfile that group or others may read.
            file.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
            let escaped = password.replace('\\', "\\\\").replace(':', "\\:");
            writeln!(file, "*:*:*:*:{escaped}")?;
            // Children get a descriptor that can only read it.
            std::fs::File::open(format!("/proc/self/fd/{fd}")).map(Into::into)
        };
        let passfile = write().map_err(|e| {
            Error::new(
                ErrorKind::Source,
                "unable to write a private passfile for PostgreSQL tools",
            )
            .with_source(e)
        })?;
        Ok(ChildAuth {
            passfile: Some(passfile),
        })
    }

    /// libpq's passfile rules: `host:port:database:user:password`, `*` matches anything,
    /// `\` escapes; the first matching line wins.
    fn password_from_passfile(&self) -> Option<String> {
        let path = env("PGPASSFILE")
            .map(PathBuf::from)
            .or_else(|| env("HOME").map(|home| Path::new(&home).join(".pgpass")))?;
        let text = std::fs::read_to_string(path).ok()?;
        let host = match self.config.get_hosts().first() {
            Some(Host::Unix(_)) | None => "localhost".to_string(),
            Some(Host::Tcp(host)) => host.clone(),
        };
        let wanted = [
            host,
            self.port().to_string(),
            self.database().to_string(),
            self.user().to_string(),
        ];
        text.lines()
            .filter(|line| !line.trim_start().starts_with('#'))
            .find_map(|line| {
                let fields = split_passfile_line(line);
                if fields.len() != 5 {
                    return None;
                }
                let matches = fields[..4]
                    .iter()
                    .zip(&wanted)
                    .all(|(field, want)| field == "*" || field == want);
                matches.then(|| fields[4].clone())
            })
    }
}

fn split_passfile_line(line: &str) -> Vec<String> {
    let mut fields = vec![String::new()];
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                if let Some(next) = chars.next() {
                    fields.last_mut().expect("not empty").push(next);
                }
            }
            ':' if fields.len() < 5 => fields.push(String::new()),
            _ => fields.last_mut().expect("not empty").push(c),
        }
    }
    fields
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passfile_lines_split_on_unescaped_colons() {
        assert_eq!(
            split_passfile_line("h:5432:*:u:p\\:w"),
            vec!["h", "5432", "*", "u", "p:w"]
        );
        assert_eq!(
            split_passfile_line("h:1:d:u:a:b"),
            vec!["h", "1", "d", "u", "a:b"]
        );
    }

    #[test]
    fn conninfo_never_holds_the_password_and_quotes_values() {
        let settings = PostgresConnection {
            dsn: Some("postgresql://backup@db1:6543/app".into()),
            ..PostgresConnection::default()
        };
        let mut connection = Connection::from_settings("job 'db'", &settings).unwrap();
        connection.password = Some("s3cret".into());
        let info = connection.with_database("it's").conninfo();
        assert!(!info.contains("s3cret"), "{info}");
        assert!(
            info.contains("host='db1' port='6543' user='backup' dbname='it\\'s'"),
            "{info}"
        );
        assert!(!format!("{connection:?}").contains("s3cret"));
    }
}
