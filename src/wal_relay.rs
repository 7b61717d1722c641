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
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};

use crate::config::Config;
use crate::error::{Error, ErrorKind, Result};
use crate::wal_archive::{
    self as wal, WalDestination, WalFetchOptions, WalFetchOutcome, WalSourceOptions,
};

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
    /// The last segment the archive held when the drill listed it: replay ends there, so
    /// that the drill measures the archive as it stood at its start, and a segment up to it
    /// that is gone now fails the drill instead of ending replay early.
    pub archive_end: Option<ArchiveEnd>,
}

#[derive(Clone, Debug)]
pub struct ArchiveEnd {
    pub name: String,
    pub segment: u64,
    pub timeline: u32,
    pub segment_size: u64,
}

/// What the relay did that the drill's report tells: the repositories that served WAL, and
/// what went wrong on the way (a copy passed over, a file refused).
#[derive(Default, Debug)]
pub struct RelayLog {
    pub repositories: Vec<String>,
    pub warnings: Vec<String>,
}

/// A bound relay socket. Each file is decoded into an unnamed file of lifeboat's own (in
/// `$TMPDIR`, opened `O_TMPFILE`) before it is passed on: nothing with a path the scratch
/// server's user could swap for a link, and nothing left behind, even after SIGKILL.
pub struct WalRelay {
    listener: UnixListener,
    socket: PathBuf,
    log: std::sync::Mutex<RelayLog>,
}

impl Drop for WalRelay {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.socket);
    }
}

impl WalRelay {
    /// Binds `dir/wal-relay.sock` for `owner` (the scratch server's user): `dir` is the
    /// scratch directory, 0700 and theirs, so nobody else reaches the socket.
    pub fn bind(dir: &Path, owner: Option<(u32, u32)>) -> Result<WalRelay> {
        let socket = dir.join("wal-relay.sock");
        let failed = |what: &str, e: std::io::Error| {
            Error::new(
                ErrorKind::Target,
                format!(
                    "unable to {what} '{}' for the drill's WAL relay",
                    socket.display()
                ),
            )
            .with_source(e)
        };
        let listener = UnixListener::bind(&socket).map_err(|e| failed("listen on", e))?;
        if let Some((uid, gid)) = owner {
            // Not following a link: the directory is the other user's.
            rustix::fs::chownat(
                rustix::fs::CWD,
                &socket,
                Some(rustix::fs::Uid::from_raw(uid)),
                Some(rustix::fs::Gid::from_raw(gid)),
                rustix::fs::AtFlags::SYMLINK_NOFOLLOW,
            )
            .map_err(|e| failed("give to postgres", e.into()))?;
        }
        Ok(WalRelay {
            listener,
            socket,
            log: Default::default(),
        })
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// What the relay did so far.
    pub fn take_log(&self) -> RelayLog {
        std::mem::take(&mut *self.log.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Answers requests until the future is dropped, several at once: a client that says
    /// nothing holds up no other. Never returns: a failed request is the client's answer.
    pub async fn serve(&self, config: &Config, source: &RelaySource) -> std::convert::Infallible {
        use futures::StreamExt;
        let mut answering = futures::stream::FuturesUnordered::new();
        loop {
            tokio::select! {
                accepted = self.listener.accept() => match accepted {
                    Ok((stream, _)) => answering.push(self.answer(stream, config, source)),
                    Err(e) => {
                        tracing::warn!("the drill's WAL relay could not accept a request: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                },
                Some(answered) = answering.next(), if !answering.is_empty() => {
                    if let Err(e) = answered {
                        tracing::warn!("the drill's WAL relay could not answer a request: {e}");
                    }
                }
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
        let end = source.archive_end.as_ref();
        let listed = crate::wal::WalFile::parse(name)
            .filter(|file| file.kind == crate::wal::WalFileKind::Segment)
            .and_then(|file| Some((file.timeline, file.segment(end?.segment_size)?)));
        if let (Some(end), Some((_, segment))) = (end, listed)
            && segment > end.segment
        {
            return write.write_all(b"missing\n").await;
        }
        let staged = tempfile::tempfile()?;
        let options = WalFetchOptions {
            name: name.to_string(),
            dest: WalDestination::File(staged.try_clone()?),
            source: WalSourceOptions {
                job: source.job.clone(),
                from: source.from.clone(),
                exclude: source.exclude.clone(),
                identity_file: source.identity_file.clone(),
            },
        };
        let answer = match wal::fetch(config, &options).await {
            Ok(WalFetchOutcome::Fetched {
                repository,
                size,
                passed_over,
            }) => {
                self.note(
                    &repository,
                    passed_over.iter().map(|problem| {
                        format!("WAL file '{name}': {problem}; served by repository '{repository}'")
                    }),
                );
                return pass_on(staged, &repository, size, &mut write).await;
            }
            Ok(WalFetchOutcome::NotArchived) => match (end, listed) {
                (Some(end), Some((timeline, _))) if timeline == end.timeline => {
                    let problem = format!(
                        "WAL segment '{name}' was in the archive when the drill listed it (up to {}), and no repository holds it now",
                        end.name
                    );
                    self.note("", [problem.clone()].into_iter());
                    format!("failed {problem}\n")
                }
                _ => "missing\n".to_string(),
            },
            Err(e) => {
                let problem = one_line(&e.chain().join(": "));
                self.note("", [format!("WAL file '{name}': {problem}")].into_iter());
                format!("failed {problem}\n")
            }
        };
        write.write_all(answer.as_bytes()).await
    }

    fn note(&self, repository: &str, warnings: impl Iterator<Item = String>) {
        let mut log = self.log.lock().unwrap_or_else(|e| e.into_inner());
        if !repository.is_empty() && !log.repositories.iter().any(|r| r == repository) {
            log.repositories.push(repository.to_string());
        }
        log.warnings.extend(warnings);
    }
}

async fn pass_on(
    mut staged: std::fs::File,
    repository: &str,
    size: u64,
    write: &mut tokio::net::unix::OwnedWriteHalf,
) -> std::io::Result<()> {
    std::io::Seek::rewind(&mut staged)?;
    let mut file = tokio::fs::File::from_std(staged).take(size);
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
    Ok(WalFetchOutcome::Fetched {
        repository,
        size,
        passed_over: Vec::new(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::repository::Repository;

    /// A config whose physical job archives into a local repository in `dir`, holding one
    /// timeline history file.
    async fn archive_with_history(dir: &Path) -> (Config, Vec<u8>) {
        let text = format!(
            "[[repository]]\nname = \"local\"\ntype = \"local\"\npath = \"{}\"\n\n\
             [[job]]\nname = \"db\"\nkind = \"postgres\"\nmode = \"physical\"\ndsn = \"postgresql://postgres@127.0.0.1:1/postgres\"\n",
            dir.join("repo").display()
        );
        let config = Config::parse(&text, &dir.join("lifeboat.toml")).unwrap();
        Repository::open(&config.repositories[0])
            .await
            .write_marker()
            .await
            .unwrap();
        let history = b"1\t0/3000000\tno recovery target specified\n".to_vec();
        let file = crate::wal::WalFile::parse("00000002.history").unwrap();
        let key = crate::layout::wal_keys("db", &file, false)[0].clone();
        let path = dir.join("repo").join(key);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, zstd::encode_all(&history[..], 3).unwrap()).unwrap();
        (config, history)
    }

    fn raw_request(socket: &Path, request: &[u8]) -> String {
        let mut stream = std::os::unix::net::UnixStream::connect(socket).unwrap();
        let _ = std::io::Write::write_all(&mut stream, request);
        let _ = stream.shutdown(std::net::Shutdown::Write);
        let mut answer = String::new();
        let _ = stream.read_to_string(&mut answer);
        answer
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_relay_passes_archived_files_and_answers_hostile_requests_with_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let (config, history) = archive_with_history(dir.path()).await;
        let relay = WalRelay::bind(dir.path(), None).unwrap();
        let socket = relay.socket().to_path_buf();
        let source = RelaySource {
            job: None,
            from: None,
            exclude: Vec::new(),
            identity_file: None,
            archive_end: Some(ArchiveEnd {
                name: "000000010000000000000005".to_string(),
                segment: 5,
                timeline: 1,
                segment_size: 16 << 20,
            }),
        };
        let client = async {
            let socket = socket.clone();
            let out = dir.path().join("out");
            tokio::task::spawn_blocking(move || {
                std::fs::create_dir(&out).unwrap();
                // A client that says nothing holds up no other: the one after it is
                // answered while it still waits.
                let mut silent = std::os::unix::net::UnixStream::connect(&socket).unwrap();
                let dest = out.join("RECOVERYHISTORY");
                let fetched = fetch_via(&socket, "00000002.history", &dest).unwrap();
                silent.set_nonblocking(true).unwrap();
                let pending = silent.read(&mut [0u8; 1]).unwrap_err();
                assert_eq!(pending.kind(), std::io::ErrorKind::WouldBlock);
                assert!(matches!(fetched, WalFetchOutcome::Fetched { size, .. } if size == history.len() as u64));
                assert_eq!(std::fs::read(&dest).unwrap(), history);
                let missing = fetch_via(&socket, "00000003.history", &out.join("x")).unwrap();
                assert!(matches!(missing, WalFetchOutcome::NotArchived));
                assert!(!out.join("x").exists());
                // Past the archive as the drill listed it: its end, whatever came since.
                let past = fetch_via(&socket, "000000010000000000000009", &out.join("x")).unwrap();
                assert!(matches!(past, WalFetchOutcome::NotArchived));
                // Listed, and gone now: recovery stops rather than promote early.
                let gone = fetch_via(&socket, "000000010000000000000003", &out.join("x"))
                    .unwrap_err();
                assert!(
                    gone.message().contains("was in the archive when the drill listed it"),
                    "{}",
                    gone.message()
                );
                assert!(!out.join("x").exists());
                for hostile in ["../../etc/passwd", "00000002.history/../../x", ""] {
                    let err = fetch_via(&socket, hostile, &out.join("y")).unwrap_err();
                    assert!(
                        err.message().contains("is not the name of a WAL archive file"),
                        "{hostile}: {}",
                        err.chain().join(": ")
                    );
                }
                // A request line without its end, or longer than any name, gets no file.
                assert_eq!(raw_request(&socket, b"00000002.history"), "failed no request line\n");
                let long = format!("{}\n", "0".repeat(4096));
                assert_eq!(raw_request(&socket, long.as_bytes()), "failed no request line\n");
                // Only the file in out/, nothing the relay staged anywhere else.
                let left: Vec<_> = std::fs::read_dir(&out).unwrap().collect();
                assert_eq!(left.len(), 1, "{left:?}");
            })
            .await
            .unwrap()
        };
        tokio::select! {
            () = client => {}
            never = relay.serve(&config, &source) => match never {},
        }
        let log = relay.take_log();
        assert_eq!(log.repositories, ["local"]);
        assert!(
            log.warnings
                .iter()
                .any(|w| w.contains("000000010000000000000003")),
            "{log:?}"
        );
    }
}
