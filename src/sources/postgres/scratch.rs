//! A throw-away PostgreSQL cluster for drills: initdb into a private temporary directory,
//! started on a Unix socket in that directory only (no TCP port at all), stopped by its pid
//! and removed when dropped — also when the drill fails.
//!
//! initdb refuses to run as root, so as root the cluster belongs to the `postgres` user.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::{Binaries, Connection};
use crate::error::{Error, ErrorKind, Result};

/// The superuser initdb creates; trusted on the private socket only.
const SUPERUSER: &str = "lifeboat";
/// Only names the socket file, which lives in the cluster's own directory.
const PORT: u16 = 5432;

pub struct ScratchCluster {
    dir: tempfile::TempDir,
    postmaster: Option<Child>,
    superuser: String,
}

/// Every scratch cluster running in this process (postmaster pid, directory), so that an
/// interrupted drill can still remove them: `stop_all` runs from a signal handler's task
/// while the drill itself may be blocked waiting on pg_restore.
static RUNNING: Mutex<Vec<(u32, PathBuf)>> = Mutex::new(Vec::new());

/// Held while a cluster's owner stops it and removes its directory, so that an interrupt
/// does not end the process halfway through.
static STOPPING: Mutex<()> = Mutex::new(());

/// The running scratch clusters, taken from their owners: from now on an owner that drops
/// its cluster leaves the stopping to `stop_taken`. For an interrupt, first of all, so that
/// what it does next (killing the clients) cannot hurry an owner into a stop of its own.
pub fn take_all() -> Vec<(u32, PathBuf)> {
    std::mem::take(&mut *RUNNING.lock().unwrap_or_else(|e| e.into_inner()))
}

/// Stops the scratch clusters `take_all` took (fast shutdown, SIGKILL after 30 s) and
/// removes their directories; then waits for an owner still stopping its own.
pub fn stop_taken(taken: Vec<(u32, PathBuf)>) {
    for (pid, dir) in taken {
        // SAFETY: kill(2) and waitpid(2) on the pid of a postmaster this process started
        // and has not reaped (it is removed from RUNNING before its owner reaps it).
        unsafe {
            libc::kill(pid as i32, libc::SIGINT);
            let deadline = Instant::now() + Duration::from_secs(30);
            let mut status = 0;
            while libc::waitpid(pid as i32, &mut status, libc::WNOHANG) == 0 {
                if Instant::now() > deadline {
                    libc::kill(pid as i32, libc::SIGKILL);
                    libc::waitpid(pid as i32, &mut status, 0);
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
    drop(STOPPING.lock().unwrap_or_else(|e| e.into_inner()));
}

fn error(message: impl Into<String>) -> Error {
    Error::new(ErrorKind::Target, message)
}

/// The uid and gid of `postgres`, when running as root.
fn run_as() -> Result<Option<(u32, u32)>> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Ok(None);
    }
    let name = std::ffi::CString::new("postgres").expect("no NUL");
    // SAFETY: getpwnam with a valid C string; the result is read before any other call.
    let entry = unsafe { libc::getpwnam(name.as_ptr()) };
    if entry.is_null() {
        return Err(error(
            "unable to create a scratch PostgreSQL cluster as root: there is no 'postgres' user to own it",
        )
        .with_hint("install the PostgreSQL server package, or run the drill as an ordinary user"));
    }
    // SAFETY: a non-null entry from getpwnam.
    let (uid, gid) = unsafe { ((*entry).pw_uid, (*entry).pw_gid) };
    Ok(Some((uid, gid)))
}

/// A private directory for a scratch cluster, before it runs: `data` inside it is made by
/// initdb ([`ScratchCluster::start`]) or restored from a base backup by the caller
/// ([`ScratchCluster::start_restored`]). Removed when dropped.
pub struct ScratchDir {
    dir: tempfile::TempDir,
    owner: Option<(u32, u32)>,
}

impl ScratchDir {
    /// In $TMPDIR; as root it belongs to `postgres`, who runs the cluster.
    pub fn create() -> Result<ScratchDir> {
        let owner = run_as()?;
        let base = std::env::var_os("TMPDIR")
            .map(PathBuf::from)
            .unwrap_or_else(std::env::temp_dir);
        // tempfile makes directories with the umask's mode; this one holds the restored data
        // and the cluster's socket, which trusts whoever reaches it: its owner's alone.
        let dir = tempfile::Builder::new()
            .prefix("lifeboat-drill-")
            .permissions(std::os::unix::fs::PermissionsExt::from_mode(0o700))
            .tempdir_in(&base)
            .map_err(|e| {
                error(format!(
                    "unable to create a scratch cluster directory in '{}'",
                    base.display()
                ))
                .with_source(e)
            })?;
        if let Some((uid, gid)) = owner {
            std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid)).map_err(|e| {
                error(format!(
                    "unable to give '{}' to postgres",
                    dir.path().display()
                ))
                .with_source(e)
            })?;
        }
        crate::interrupt::remove_on_interrupt(dir.path());
        Ok(ScratchDir { dir, owner })
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Who runs the cluster, when lifeboat (as root) does not.
    pub fn owner(&self) -> Option<(u32, u32)> {
        self.owner
    }

    /// Runs the postmaster on the private socket only, with `settings` (`name=value`).
    fn spawn(
        self,
        binaries: &Binaries,
        settings: &[String],
        superuser: &str,
    ) -> Result<ScratchCluster> {
        let child = spawn_postmaster(self.dir.path(), self.owner, binaries, settings)?;
        crate::interrupt::forget(self.dir.path());
        Ok(ScratchCluster {
            dir: self.dir,
            postmaster: Some(child),
            superuser: superuser.to_string(),
        })
    }
}

fn spawn_postmaster(
    dir: &Path,
    owner: Option<(u32, u32)>,
    binaries: &Binaries,
    settings: &[String],
) -> Result<Child> {
    // The kept environment alone (`process::server`): a restored cluster fetches its WAL
    // through the drill's relay, without the storage credentials.
    let mut postgres = binaries.server_command("postgres");
    postgres
        .arg("-D")
        .arg(dir.join("data"))
        .arg("-p")
        .arg(PORT.to_string())
        .arg("-k")
        .arg(dir)
        .args([
            "-c",
            "listen_addresses=",
            "-c",
            "unix_socket_permissions=0700",
        ])
        .args(settings.iter().flat_map(|s| ["-c", s.as_str()]))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(dir.join("postgres.log"))
                .map_err(|e| error("unable to create the scratch cluster's log").with_source(e))?,
        );
    as_owner(&mut postgres, owner);
    let mut running = RUNNING.lock().unwrap_or_else(|e| e.into_inner());
    let child = postgres.spawn().map_err(|e| {
        error("unable to start the scratch cluster: cannot run postgres").with_source(e)
    })?;
    running.push((child.id(), dir.to_path_buf()));
    Ok(child)
}

impl ScratchCluster {
    /// Creates and starts a cluster with `binaries`, waiting until it accepts connections.
    pub async fn start(binaries: &Binaries) -> Result<ScratchCluster> {
        let scratch = ScratchDir::create()?;
        let mut initdb = binaries.server_command("initdb");
        initdb
            .arg("--pgdata")
            .arg(scratch.data_dir())
            .args(["--username", SUPERUSER, "--auth=trust", "--encoding=UTF8"])
            .args(["--locale=C.UTF-8", "--no-sync"]);
        as_owner(&mut initdb, scratch.owner);
        crate::sources::process::run(initdb, "create a scratch cluster with initdb")?;
        let mut cluster = scratch.spawn(binaries, &[], SUPERUSER)?;
        cluster.wait_ready().await?;
        Ok(cluster)
    }

    /// Starts the data directory a physical restore wrote into `scratch`, set up for
    /// recovery, and waits until recovery has finished. The source's roles and pg_hba are
    /// in it; lifeboat trusts the private socket instead (its own hba file), reaches the
    /// cluster as `user` and goes on as the bootstrap superuser. It never archives.
    pub async fn start_restored(
        scratch: ScratchDir,
        binaries: &Binaries,
        user: &str,
    ) -> Result<ScratchCluster> {
        let hba = scratch.dir.path().join("lifeboat_hba.conf");
        // A new file, never one already there (or a link put there by the directory's owner).
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&hba)
            .and_then(|mut file| std::io::Write::write_all(&mut file, b"local all all trust\n"))
            .map_err(|e| error("unable to write the scratch cluster's hba file").with_source(e))?;
        let settings = [
            format!("hba_file={}", hba.display()),
            "archive_mode=off".to_string(),
            "hot_standby=on".to_string(),
        ];
        // No deadline: replay takes as long as the archive is long, and that time is the
        // drill's measurement. A postmaster that gives up is noticed at once.
        let mut cluster = scratch.spawn(binaries, &settings, user)?;
        let connection = Connection::from_dsn(&cluster.dsn("postgres"))?;
        loop {
            cluster.check_running()?;
            if let Ok(client) = connection.connect().await
                && let Ok(row) = client
                    .query_one(
                        "select pg_is_in_recovery(), (select rolname from pg_roles where oid = 10)",
                        &[],
                    )
                    .await
                && !row.get::<_, bool>(0)
            {
                cluster.superuser = row.get(1);
                return Ok(cluster);
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// A DSN for the cluster's `database`, over its private socket.
    pub fn dsn(&self, database: &str) -> String {
        format!(
            "host={} port={PORT} user={} dbname={database}",
            self.dir.path().display(),
            self.superuser
        )
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Fails, quoting the end of its log, once the postmaster has exited.
    fn check_running(&mut self) -> Result<()> {
        if let Some(child) = self.postmaster.as_mut()
            && let Ok(Some(status)) = child.try_wait()
        {
            let log =
                std::fs::read_to_string(self.dir.path().join("postgres.log")).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(30).collect();
            return Err(error(format!(
                "the scratch cluster stopped ({status}); its log ends with:\n{}",
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            )));
        }
        Ok(())
    }

    async fn wait_ready(&mut self) -> Result<()> {
        let connection = Connection::from_dsn(&self.dsn("postgres"))?;
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            self.check_running()?;
            if connection.connect().await.is_ok() {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(error(
                    "the scratch cluster did not accept connections within 60 s",
                ));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Fast shutdown (SIGINT to the postmaster), waiting for it; SIGKILL after 30 s.
    pub fn stop(&mut self) {
        let Some(mut child) = self.postmaster.take() else {
            return;
        };
        let mut running = RUNNING.lock().unwrap_or_else(|e| e.into_inner());
        let Some(index) = running.iter().position(|(pid, _)| *pid == child.id()) else {
            // An interrupt's `stop_all` took it over (and reaps it).
            return;
        };
        running.remove(index);
        drop(running);
        crate::sources::process::stop_child(&mut child, libc::SIGINT, Duration::from_secs(30));
    }
}

impl Drop for ScratchCluster {
    fn drop(&mut self) {
        let _stopping = STOPPING.lock().unwrap_or_else(|e| e.into_inner());
        self.stop();
        let _ = std::fs::remove_dir_all(self.dir.path());
    }
}

fn as_owner(command: &mut Command, owner: Option<(u32, u32)>) {
    if let Some((uid, gid)) = owner {
        command.uid(uid).gid(gid);
    }
}
