//! WAL for a drill's scratch server without the repositories' credentials in its
//! environment. The drill's lifeboat fetches, decrypts and checks each file itself, as
//! `wal-fetch` does, and passes the decoded bytes over a Unix socket in the scratch
//! directory to `wal-fetch --via SOCKET`, the scratch server's restore_command. A check
//! run on the scratch server (which is a superuser there) then finds no secret in
//! `/proc/<postmaster>/environ`, and the socket reaches only what the drill restores.
//!
//! One request per connection: `NAME\n`. One answer: `fetched SIZE REPOSITORY\n` and SIZE
//! bytes, `missing\n` (the archive lacks it: PostgreSQL's end of the archive), or
//! `failed MESSAGE\n` (recovery must stop).

use std::io::{BufRead, BufReader, Read};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};

use super::wal::{self, WalFetchOptions, WalFetchOutcome};
use crate::config::Config;
use crate::error::{Error, ErrorKind, Result};

/// The longest request line: a WAL file name is 40 characters at most (a backup history
/// file), so anything longer is no request.
const MAX_REQUEST: u64 = 128;
/// How long a client has to say what it wants: one that says nothing holds up no replay.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// Where the relay reads from: `wal-fetch`'s options but the file and its destination.
pub struct RelaySource {
    pub job: Option<String>,
    pub from: Option<String>,
    pub exclude: Vec<String>,
    pub identity_file: Option<PathBuf>,
}

/// A bound relay socket and the private directory each file is decoded into before it is
/// passed on. Both live in the scratch directory, which is removed with the drill.
pub struct WalRelay {
    listener: UnixListener,
    socket: PathBuf,
    staging: PathBuf,
}

impl WalRelay {
    /// Binds `dir/wal-relay.sock`, usable by `owner` (the scratch server's user) alone.
    pub fn bind(dir: &Path, owner: Option<(u32, u32)>) -> Result<WalRelay> {
        let socket = dir.join("wal-relay.sock");
        let staging = dir.join("wal-relay");
        let failed = |what: &str, e: std::io::Error| {
            Error::new(
                ErrorKind::Target,
                format!("unable to {what} for the drill's WAL relay"),
            )
            .with_source(e)
        };
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&staging)
            .map_err(|e| failed(&format!("create '{}'", staging.display()), e))?;
        let listener = UnixListener::bind(&socket)
            .map_err(|e| failed(&format!("listen on '{}'", socket.display()), e))?;
        std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o600))
            .map_err(|e| failed(&format!("restrict '{}'", socket.display()), e))?;
        if let Some((uid, gid)) = owner {
            std::os::unix::fs::chown(&socket, Some(uid), Some(gid))
                .map_err(|e| failed(&format!("give '{}' to postgres", socket.display()), e))?;
        }
        Ok(WalRelay {
            listener,
            socket,
            staging,
        })
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Answers requests one after another (PostgreSQL asks for one file at a time) until
    /// the future is dropped. Never returns: a failed request is the client's answer.
    pub async fn serve(&self, config: &Config, source: &RelaySource) -> std::convert::Infallible {
        loop {
            let stream = match self.listener.accept().await {
                Ok((stream, _)) => stream,
                Err(e) => {
                    tracing::warn!("the drill's WAL relay could not accept a request: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            if let Err(e) = self.answer(stream, config, source).await {
                tracing::warn!("the drill's WAL relay could not answer a request: {e}");
            }
        }
    }

    async fn answer(
        &self,
        stream: UnixStream,
        config: &Config,
        source: &RelaySource,
    ) -> std::io::Result<()> {
        let (read, mut write) = stream.into_split();
        let mut line = String::new();
        let mut request = tokio::io::BufReader::new(read).take(MAX_REQUEST);
        tokio::time::timeout(REQUEST_TIMEOUT, request.read_line(&mut line))
            .await
            .map_err(|_| std::io::Error::other("no request within 5 s"))??;
        let Some(name) = line.strip_suffix('\n') else {
            return write.write_all(b"failed no request line\n").await;
        };
        // The staged copy has a name of its own: the request names nothing on this side.
        let dest = self.staging.join("file");
        let options = WalFetchOptions {
            name: name.to_string(),
            dest: dest.clone(),
            job: source.job.clone(),
            from: source.from.clone(),
            exclude: source.exclude.clone(),
            identity_file: source.identity_file.clone(),
        };
        let answer = match wal::fetch(config, &options).await {
            Ok(WalFetchOutcome::Fetched { repository, size }) => {
                let passed = pass_on(&dest, &repository, size, &mut write).await;
                let _ = std::fs::remove_file(&dest);
                return passed;
            }
            Ok(WalFetchOutcome::NotArchived) => "missing\n".to_string(),
            Err(e) => format!("failed {}\n", one_line(&e.chain().join(": "))),
        };
        write.write_all(answer.as_bytes()).await
    }
}

async fn pass_on(
    staged: &Path,
    repository: &str,
    size: u64,
    write: &mut tokio::net::unix::OwnedWriteHalf,
) -> std::io::Result<()> {
    let mut file = tokio::fs::File::open(staged).await?;
    write
        .write_all(format!("fetched {size} {}\n", one_line(repository)).as_bytes())
        .await?;
    tokio::io::copy(&mut file, write).await?;
    write.shutdown().await
}

fn one_line(text: &str) -> String {
    text.replace(['\n', '\r'], " ")
}

/// `wal-fetch --via SOCKET NAME DEST`: asks the drill's relay for `name` and writes it to
/// `dest` atomically, as `wal-fetch` would. It reads no config and holds no credential.
pub fn fetch_via(socket: &Path, name: &str, dest: &Path) -> Result<WalFetchOutcome> {
    let relay_error = |what: &str, e: std::io::Error| {
        Error::new(
            ErrorKind::Storage,
            format!(
                "unable to {what} WAL file '{name}' through the drill's relay '{}'",
                socket.display()
            ),
        )
        .with_source(e)
    };
    let mut stream =
        std::os::unix::net::UnixStream::connect(socket).map_err(|e| relay_error("ask for", e))?;
    std::io::Write::write_all(&mut stream, format!("{}\n", one_line(name)).as_bytes())
        .map_err(|e| relay_error("ask for", e))?;
    let mut reader = BufReader::new(stream);
    let mut header = String::new();
    reader
        .by_ref()
        .take(4096)
        .read_line(&mut header)
        .map_err(|e| relay_error("receive", e))?;
    let header = header.trim_end_matches('\n');
    if header == "missing" {
        return Ok(WalFetchOutcome::NotArchived);
    }
    if let Some(message) = header.strip_prefix("failed ") {
        return Err(Error::new(
            ErrorKind::Storage,
            format!("the drill's WAL relay could not fetch '{name}': {message}"),
        ));
    }
    let fetched = header.strip_prefix("fetched ").and_then(|rest| {
        let (size, repository) = rest.split_once(' ')?;
        Some((size.parse::<u64>().ok()?, repository.to_string()))
    });
    let Some((size, repository)) = fetched else {
        return Err(Error::new(
            ErrorKind::Storage,
            format!("the drill's WAL relay answered no known reply for '{name}': '{header}'"),
        ));
    };
    let parent = dest
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let write_error = |e: std::io::Error| {
        Error::new(
            ErrorKind::Target,
            format!("unable to write WAL file '{}'", dest.display()),
        )
        .with_source(e)
    };
    let mut temp = tempfile::Builder::new()
        .prefix(".lifeboat-wal-fetch-")
        .tempfile_in(parent)
        .map_err(write_error)?;
    let copied = std::io::copy(&mut reader.take(size), temp.as_file_mut())
        .map_err(|e| relay_error("receive", e))?;
    // PostgreSQL must never see a partial segment under the real name.
    if copied != size {
        return Err(relay_error(
            "receive",
            std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                format!("the relay ended after {copied} of {size} bytes"),
            ),
        ));
    }
    temp.persist(dest).map_err(|e| write_error(e.error))?;
    Ok(WalFetchOutcome::Fetched { repository, size })
}
