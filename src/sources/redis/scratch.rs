//! A throw-away redis-server loading a restored RDB: on a free loopback port, persistence
//! off, in a private directory, behind a password of its own (the port is anyone's on this
//! host to reach; the restored data is not). Stopped (by its pid) and removed when dropped,
//! unless it is handed over to the operator with [`ScratchRedis::keep`].

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use super::RedisServer;
use crate::error::{Error, ErrorKind, Result};

/// Pids of the scratch servers running in this process, for an interrupted run to stop.
static RUNNING: std::sync::Mutex<Vec<u32>> = std::sync::Mutex::new(Vec::new());

/// An interrupt's last step: every scratch redis-server this process started and still runs
/// stopped (SIGTERM).
fn stop_all() -> Option<String> {
    for pid in std::mem::take(&mut *RUNNING.lock().unwrap_or_else(|e| e.into_inner())) {
        // SAFETY: kill(2) on the pid of a redis-server this process started.
        unsafe {
            libc::kill(pid as i32, libc::SIGTERM);
        }
    }
    None
}

fn forget_pid(pid: u32) {
    RUNNING
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .retain(|p| *p != pid);
}

pub struct ScratchRedis {
    dir: Option<tempfile::TempDir>,
    child: Option<Child>,
    pub port: u16,
    /// The server's `requirepass`, made for it.
    password: String,
}

/// The name of the file, in a kept server's directory, that holds its password.
pub const PASSWORD_FILE: &str = "password";

/// 32 hex digits from the kernel's random source.
fn new_password() -> Result<String> {
    use std::io::Read;
    let mut bytes = [0u8; 16];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut random| random.read_exact(&mut bytes))
        .map_err(|e| {
            error("unable to make a password for the scratch redis-server").with_source(e)
        })?;
    Ok(hex::encode(bytes))
}

/// Writes `text` to `path`, readable by its owner alone.
fn write_private(path: &Path, text: &str) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .and_then(|mut file| file.write_all(text.as_bytes()))
        .map_err(|e| error(format!("unable to write '{}'", path.display())).with_source(e))
}

fn error(message: impl Into<String>) -> Error {
    Error::new(ErrorKind::Target, message)
}

fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind(("127.0.0.1", 0))?
        .local_addr()?
        .port())
}

impl ScratchRedis {
    /// A private directory in $TMPDIR to restore the RDB into, as `dump.rdb`.
    pub fn prepare() -> Result<(tempfile::TempDir, PathBuf)> {
        // tempfile makes directories with the umask's mode: this one holds restored data.
        let dir = crate::interrupt::make_dir_removed_on_interrupt(
            || {
                tempfile::Builder::new()
                    .prefix("lifeboat-redis-")
                    .permissions(std::os::unix::fs::PermissionsExt::from_mode(0o700))
                    .tempdir()
            },
            |dir| dir.path().to_path_buf(),
        )
        .map_err(|e| {
            error("unable to create a scratch directory for redis-server").with_source(e)
        })?;
        let rdb = dir.path().join("dump.rdb");
        Ok((dir, rdb))
    }

    /// Starts redis-server on the `dump.rdb` in `dir` and waits until it has loaded it.
    pub async fn start(dir: tempfile::TempDir) -> Result<ScratchRedis> {
        let path = dir.path().to_path_buf();
        let password = new_password()?;
        // In a file, not on the command line, where any user could read it.
        write_private(
            &path.join("redis.conf"),
            &format!("requirepass {password}\n"),
        )?;
        let mut scratch = ScratchRedis {
            dir: Some(dir),
            child: None,
            port: 0,
            password,
        };
        let mut last_log = String::new();
        for _ in 0..5 {
            scratch.port =
                free_port().map_err(|e| error("unable to find a free port").with_source(e))?;
            // Before the server exists: an interrupt from now on stops it.
            crate::interrupt::at_interrupt(crate::interrupt::Step::Stop, stop_all);
            // Held across the spawn: an interrupt's stop waits for the pid to be recorded.
            let child = {
                let mut running = RUNNING.lock().unwrap_or_else(|e| e.into_inner());
                let child = spawn(&path, scratch.port)?;
                running.push(child.id());
                child
            };
            scratch.child = Some(child);
            match scratch.wait_loaded().await {
                Ok(()) => return Ok(scratch),
                Err(log) => {
                    scratch.stop();
                    // Another process may have taken the port between the probe and the start.
                    let retry = log.contains("Address already in use");
                    last_log = log;
                    if !retry {
                        break;
                    }
                }
            }
        }
        Err(error(format!(
            "unable to start a scratch redis-server on the restored RDB; its log ends with:\n{last_log}"
        )))
    }

    pub fn address(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn server(&self) -> RedisServer {
        RedisServer::local(self.port, Some(self.password.clone()))
    }

    fn log_tail(&self) -> String {
        let Some(dir) = &self.dir else {
            return String::new();
        };
        let log = std::fs::read_to_string(dir.path().join("redis.log")).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(20).collect();
        tail.into_iter().rev().collect::<Vec<_>>().join("\n")
    }

    /// Ok once PING answers (it says LOADING until the RDB is in); Err with the log tail if
    /// the server exits first.
    async fn wait_loaded(&mut self) -> std::result::Result<(), String> {
        let server = self.server();
        let started = Instant::now();
        loop {
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                return Err(format!("({status})\n{}", self.log_tail()));
            }
            if let Ok(Some(reply)) = server.query(&["PING".to_string()]).await
                && reply == "PONG"
            {
                return Ok(());
            }
            if started.elapsed() > Duration::from_secs(3600) {
                return Err(format!(
                    "it did not load within an hour\n{}",
                    self.log_tail()
                ));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Leaves the server running for the operator; returns its pid and directory, which
    /// they remove when done.
    // Never waited for on purpose: it outlives lifeboat, which exits right after this.
    #[allow(clippy::zombie_processes)]
    /// Its password is left in `PASSWORD_FILE` in that directory (0600).
    pub fn keep(mut self) -> Result<(u32, PathBuf)> {
        if let Some(dir) = &self.dir {
            write_private(
                &dir.path().join(PASSWORD_FILE),
                &format!("{}\n", self.password),
            )?;
        }
        let child = self.child.take().expect("running");
        forget_pid(child.id());
        let dir = self.dir.take().expect("kept").keep();
        crate::interrupt::forget(&dir);
        Ok((child.id(), dir))
    }

    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            forget_pid(child.id());
            crate::sources::process::stop_child(&mut child, libc::SIGTERM, Duration::from_secs(10));
        }
    }
}

impl Drop for ScratchRedis {
    fn drop(&mut self) {
        self.stop();
        if let Some(dir) = &self.dir {
            crate::interrupt::forget(dir.path());
        }
    }
}

fn spawn(dir: &Path, port: u16) -> Result<Child> {
    let mut command = crate::sources::process::server("redis-server");
    command
        .arg(dir.join("redis.conf"))
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        .arg("--dir")
        .arg(dir)
        .args([
            "--dbfilename",
            "dump.rdb",
            "--save",
            "",
            "--appendonly",
            "no",
        ])
        .args(["--daemonize", "no", "--protected-mode", "yes"])
        .arg("--logfile")
        .arg(dir.join("redis.log"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        // Its own process group: an operator's Ctrl-C on lifeboat does not reach a server
        // handed over with `keep`.
        .process_group(0);
    command.spawn().map_err(|e| {
        error("unable to start a scratch redis-server: cannot run redis-server")
            .with_source(e)
            .with_hint("install it (Debian: apt-get install redis-server)")
    })
}
