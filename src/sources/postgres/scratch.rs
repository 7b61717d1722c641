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
    /// The directory's lock, held while this process may still use it: a directory whose
    /// lock is free was left by a drill that was killed, and the next drill removes it.
    _held: std::os::fd::OwnedFd,
    postmaster: Option<Child>,
    superuser: String,
    /// The role the drill's checks run as: they read everything and are no superuser.
    reader: Option<String>,
    /// Why the cluster does not run as a user of its own, if it does not.
    user_warning: Option<String>,
    /// The dedicated scratch user's uid, whose stray processes are killed when it stops.
    dedicated_uid: Option<u32>,
}

/// How lifeboat opens a scratch directory: never through a link its owner put in its place.
const DIRECTORY_NOFOLLOW: rustix::fs::OFlags = rustix::fs::OFlags::DIRECTORY
    .union(rustix::fs::OFlags::RDONLY)
    .union(rustix::fs::OFlags::NOFOLLOW)
    .union(rustix::fs::OFlags::CLOEXEC);

/// What scratch directories are called in `$TMPDIR`.
const PREFIX: &str = "lifeboat-drill-";
/// Inside a scratch directory made by a lifeboat that locks it: only those are ever taken
/// for abandoned (an older lifeboat's running drill is not).
const OWNER_FILE: &str = "lifeboat-drill.owner";

/// Every scratch cluster running in this process (postmaster pid, directory), so that an
/// interrupted drill can still remove them: `stop_seized` runs from a signal handler's task
/// while the drill itself may be blocked waiting on pg_restore.
static RUNNING: Mutex<Vec<(u32, PathBuf)>> = Mutex::new(Vec::new());

/// Held while a cluster's owner stops it and removes its directory, so that an interrupt
/// does not end the process halfway through.
static STOPPING: Mutex<()> = Mutex::new(());

/// The clusters an interrupt took from their owners, for it to stop after its undos.
static SEIZED: Mutex<Vec<(u32, PathBuf)>> = Mutex::new(Vec::new());

/// An interrupt's first step: the running scratch clusters, taken from their owners. From
/// now on an owner that drops its cluster leaves the stopping to `stop_seized`, so that what
/// the interrupt does next (killing the clients) cannot hurry an owner into a stop of its own.
fn seize_all() -> Option<String> {
    let taken = std::mem::take(&mut *RUNNING.lock().unwrap_or_else(|e| e.into_inner()));
    SEIZED
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .extend(taken);
    None
}

/// An interrupt's last step: the seized clusters stopped.
fn stop_seized() -> Option<String> {
    let seized = std::mem::take(&mut *SEIZED.lock().unwrap_or_else(|e| e.into_inner()));
    let count = seized.len();
    stop_taken(seized);
    (count > 0).then(|| format!("{count} scratch cluster(s) stopped"))
}

/// Stops the scratch clusters `seize_all` took (fast shutdown, SIGKILL after 30 s) and
/// removes their directories; then waits for an owner still stopping its own.
fn stop_taken(taken: Vec<(u32, PathBuf)>) {
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

/// The system user scratch servers run as when lifeboat runs as root: one of their own, so
/// that what runs in them (a check, or code the restored data carries, such as a function a
/// CHECK constraint calls during the load) cannot reach the production server's processes
/// and files as `postgres` could.
pub const SCRATCH_USER: &str = "lifeboat-scratch";

/// A user's uid and gid.
type Ids = (u32, u32);

/// The uid and gid scratch servers run as, when running as root: `lifeboat-scratch`, else
/// `postgres` with a warning saying what that exposes and how to make the user.
fn run_as() -> Result<(Option<Ids>, Option<String>)> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        let me = std::env::var("USER").unwrap_or_else(|_| "this user".to_string());
        return Ok((
            None,
            Some(format!(
                "the scratch cluster ran as '{me}', the user lifeboat runs as, so code in the restored data ran with its rights (its keys, password files and credentials); run drills as root, which runs the scratch cluster as the user '{SCRATCH_USER}'"
            )),
        ));
    }
    if let Some(ids) = user_ids(SCRATCH_USER) {
        return Ok((Some(ids), None));
    }
    let Some(ids) = user_ids("postgres") else {
        return Err(error(format!(
            "unable to create a scratch PostgreSQL cluster as root: there is no '{SCRATCH_USER}' or 'postgres' user to own it"
        ))
        .with_hint(format!(
            "create the user: useradd --system --user-group --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin {SCRATCH_USER}"
        )));
    };
    Ok((
        Some(ids),
        Some(format!(
            "the scratch cluster ran as 'postgres', the user production servers run as, so code in the restored data could reach them; create the user '{SCRATCH_USER}' (useradd --system --user-group --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin {SCRATCH_USER}) and drills use it"
        )),
    ))
}

/// Kills (SIGKILL) the processes of the scratch user `uid` that no running lifeboat leads
/// to: what code in a restored backup left behind (a daemon it detached), which would
/// otherwise live on into later drills, which run as the same user. A process of a drill
/// still running has, above it, the scratch postmaster and the lifeboat that started it;
/// a stray one reaches init first. Only ever for the dedicated user, never `postgres`.
/// Returns the pids it killed.
fn kill_strays(uid: u32) -> Vec<i32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    // (uid, parent) of a process, from /proc/PID/status.
    let owner_and_parent = |pid: i32| -> Option<(u32, i32)> {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        let field = |name: &str| {
            status
                .lines()
                .find_map(|line| line.strip_prefix(name))
                .and_then(|rest| rest.split_whitespace().next())
                .map(str::to_string)
        };
        Some((field("Uid:")?.parse().ok()?, field("PPid:")?.parse().ok()?))
    };
    let mut killed = Vec::new();
    for pid in entries
        .filter_map(std::result::Result::ok)
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
    {
        if owner_and_parent(pid).map(|(owner, _)| owner) != Some(uid) {
            continue;
        }
        let mut at = pid;
        let stray = loop {
            match owner_and_parent(at) {
                Some((owner, _)) if owner != uid => break at <= 1,
                Some((_, parent)) if parent > 0 => at = parent,
                _ => break true,
            }
        };
        if stray {
            // SAFETY: kill(2) on a process of the dedicated scratch user.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            killed.push(pid);
        }
    }
    killed
}

fn user_ids(name: &str) -> Option<(u32, u32)> {
    let name = std::ffi::CString::new(name).ok()?;
    // SAFETY: getpwnam with a valid C string; the result is read before any other call.
    let entry = unsafe { libc::getpwnam(name.as_ptr()) };
    if entry.is_null() {
        return None;
    }
    // SAFETY: a non-null entry from getpwnam.
    Some(unsafe { ((*entry).pw_uid, (*entry).pw_gid) })
}

/// A private directory for a scratch cluster, before it runs: `data` inside it is made by
/// initdb ([`ScratchCluster::start`]) or restored from a base backup by the caller
/// ([`ScratchCluster::start_restored`]). Removed when dropped.
pub struct ScratchDir {
    dir: tempfile::TempDir,
    held: std::os::fd::OwnedFd,
    owner: Option<(u32, u32)>,
    /// Why the cluster's user is not one of its own, for the drill's report.
    warning: Option<String>,
}

impl ScratchDir {
    /// In $TMPDIR; as root it belongs to `postgres`, who runs the cluster. Scratch
    /// directories of drills that were killed are removed first (and named).
    pub fn create() -> Result<ScratchDir> {
        let (owner, mut warning) = run_as()?;
        if let Some((uid, _)) = owner.filter(|_| warning.is_none()) {
            let killed = kill_strays(uid);
            if !killed.is_empty() {
                let said = format!(
                    "stopped {} process(es) of the user '{SCRATCH_USER}' that an earlier drill left running (pids {:?}): code in a restored backup started them",
                    killed.len(),
                    killed
                );
                tracing::warn!("{said}");
                warning = Some(said);
            }
        }
        let base = std::env::var_os("TMPDIR")
            .map(PathBuf::from)
            .unwrap_or_else(std::env::temp_dir);
        for removed in remove_abandoned(&base) {
            tracing::warn!("{removed}");
        }
        // tempfile makes directories with the umask's mode; this one holds the restored data
        // and the cluster's socket, which trusts whoever reaches it: its owner's alone.
        let dir = crate::interrupt::make_dir_removed_on_interrupt(
            || {
                tempfile::Builder::new()
                    .prefix(PREFIX)
                    .permissions(std::os::unix::fs::PermissionsExt::from_mode(0o700))
                    .tempdir_in(&base)
            },
            |dir| dir.path().to_path_buf(),
        )
        .map_err(|e| {
            error(format!(
                "unable to create a scratch cluster directory in '{}'",
                base.display()
            ))
            .with_source(e)
        })?;
        let unusable = |e: std::io::Error| {
            error(format!(
                "unable to set up the scratch cluster directory '{}'",
                dir.path().display()
            ))
            .with_source(e)
        };
        let held = rustix::fs::open(dir.path(), DIRECTORY_NOFOLLOW, rustix::fs::Mode::empty())
            .and_then(|fd| {
                rustix::fs::flock(&fd, rustix::fs::FlockOperation::LockExclusive)?;
                Ok(fd)
            })
            .map_err(|e| unusable(e.into()))?;
        let host = hostname::get()
            .map(|name| name.to_string_lossy().into_owned())
            .unwrap_or_default();
        rustix::fs::openat(
            &held,
            OWNER_FILE,
            rustix::fs::OFlags::WRONLY
                | rustix::fs::OFlags::CREATE
                | rustix::fs::OFlags::EXCL
                | rustix::fs::OFlags::NOFOLLOW
                | rustix::fs::OFlags::CLOEXEC,
            rustix::fs::Mode::from_raw_mode(0o644),
        )
        .map_err(std::io::Error::from)
        .and_then(|fd| {
            std::io::Write::write_all(
                &mut std::fs::File::from(fd),
                format!("pid {} on host {host}\n", std::process::id()).as_bytes(),
            )
        })
        .map_err(unusable)?;
        // The data directory is made here, the cluster user's, whatever fills it (initdb,
        // or a physical restore, which gives what it writes to the directory's owner).
        rustix::fs::mkdirat(&held, "data", rustix::fs::Mode::from_raw_mode(0o700))
            .map_err(|e| unusable(e.into()))?;
        if let Some((uid, gid)) = owner {
            let data =
                rustix::fs::openat(&held, "data", DIRECTORY_NOFOLLOW, rustix::fs::Mode::empty());
            data.and_then(|data| {
                for fd in [&held, &data] {
                    rustix::fs::fchown(
                        fd,
                        Some(rustix::fs::Uid::from_raw(uid)),
                        Some(rustix::fs::Gid::from_raw(gid)),
                    )?;
                }
                Ok(())
            })
            .map_err(|e| {
                error(format!(
                    "unable to give '{}' to the scratch cluster's user",
                    dir.path().display()
                ))
                .with_source(std::io::Error::from(e))
            })?;
        }
        Ok(ScratchDir {
            dir,
            held,
            owner,
            warning,
        })
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Why the cluster does not run as a user of its own, if it does not.
    pub fn warning(&self) -> Option<String> {
        self.warning.clone()
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
            _held: self.held,
            postmaster: Some(child),
            superuser: superuser.to_string(),
            reader: None,
            dedicated_uid: self
                .owner
                .filter(|_| user_ids(SCRATCH_USER).is_some_and(|ids| Some(ids) == self.owner))
                .map(|(uid, _)| uid),
            user_warning: self.warning,
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
    // through the drill's relay, without the storage credentials. Immediate shutdown
    // (SIGQUIT) when lifeboat dies, even by SIGKILL: no scratch server outlives its drill.
    let mut postgres = binaries.server_command("postgres");
    as_owner(&mut postgres, owner);
    crate::sources::process::die_with_lifeboat(&mut postgres, libc::SIGQUIT);
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
    // Before the postmaster exists: an interrupt from now on seizes and stops it (waiting
    // on RUNNING while it starts).
    crate::interrupt::at_interrupt(crate::interrupt::Step::Seize, seize_all);
    crate::interrupt::at_interrupt(crate::interrupt::Step::Stop, stop_seized);
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

    /// A DSN for the cluster's `database`, over its private socket, as its superuser.
    pub fn dsn(&self, database: &str) -> String {
        format!(
            "host={} port={PORT} user={} dbname={database}",
            self.dir.path().display(),
            self.superuser
        )
    }

    /// A DSN for the drill's checks: as the reader role once `add_reader` made it.
    pub fn check_dsn(&self, database: &str) -> String {
        format!(
            "host={} port={PORT} user={} dbname={database}",
            self.dir.path().display(),
            self.reader.as_deref().unwrap_or(&self.superuser)
        )
    }

    /// Makes the role the checks run as: it logs in and reads all data, statistics and
    /// settings (`pg_read_all_data`, `pg_monitor`), and is no superuser, so a check cannot
    /// read the host's files, run programs or reach another process's environment as the
    /// server's user. Returns the warnings for the report: where the server has no
    /// `pg_read_all_data` (before 14) the checks run as the superuser, and where the
    /// cluster runs as `postgres` (see `run_as`).
    pub async fn add_reader(&mut self) -> Result<Vec<String>> {
        let mut warnings: Vec<String> = self.user_warning.iter().cloned().collect();
        let client = Connection::from_dsn(&self.dsn("postgres"))?
            .connect()
            .await?;
        let version: i32 = client
            .query_one("select current_setting('server_version_num')::int", &[])
            .await
            .map_err(|e| error("unable to read the scratch cluster's version").with_source(e))?
            .get(0);
        if version < 140000 {
            warnings.push(
                "the checks ran as the scratch cluster's superuser: PostgreSQL before 14 has no pg_read_all_data role".to_string(),
            );
            return Ok(warnings);
        }
        // Apart from every role the backup brought along.
        let unique = {
            use std::hash::{BuildHasher, Hasher};
            let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
            hasher.write_u32(std::process::id());
            hasher.finish() as u32
        };
        let name = format!("lifeboat_check_{unique:08x}");
        client
            .batch_execute(&format!(
                "create role {name} login nosuperuser nocreatedb nocreaterole noreplication; \
                 grant pg_read_all_data, pg_monitor to {name}"
            ))
            .await
            .map_err(|e| {
                error("unable to create the checks' role in the scratch cluster").with_source(e)
            })?;
        self.reader = Some(name);
        Ok(warnings)
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Checks every database of the cluster with `pg_amcheck --heapallindexed` (each heap
    /// page's tuples, each B-tree's structure, and that every heap tuple is in its indexes),
    /// creating the `amcheck` extension in each: this cluster is thrown away after, so
    /// nothing is ever created in a server someone uses. The corruption reported: each
    /// relation (and block) with what is wrong; empty when none.
    pub async fn amcheck(&self, binaries: &Binaries) -> Result<Vec<String>> {
        let client = Connection::from_dsn(&self.dsn("postgres"))?
            .connect()
            .await?;
        let databases: Vec<String> = client
            .query(
                "select datname from pg_database where datallowconn and not datistemplate order by 1",
                &[],
            )
            .await
            .map_err(|e| error("unable to list the scratch cluster's databases").with_source(e))?
            .iter()
            .map(|row| row.get(0))
            .collect();
        for database in &databases {
            Connection::from_dsn(&self.dsn(database))?
                .connect()
                .await?
                .batch_execute("create extension if not exists amcheck")
                .await
                .map_err(|e| {
                    error(format!(
                        "unable to create the amcheck extension in the scratch cluster's database '{database}'"
                    ))
                    .with_source(e)
                })?;
        }
        let mut command = binaries.command("pg_amcheck");
        command
            .args(["--heapallindexed", "--all", "--no-password"])
            .arg("--host")
            .arg(self.dir.path())
            .args(["--port", &PORT.to_string(), "--username", &self.superuser])
            .env("LC_MESSAGES", "C");
        // It reads every page of every relation: minutes to hours, off the async workers.
        let output =
            tokio::task::spawn_blocking(move || crate::sources::process::output(&mut command))
                .await
                .map_err(|e| error("pg_amcheck's runner stopped").with_source(e))?
                .map_err(|e| {
                    error("unable to run pg_amcheck (PostgreSQL 14 or later)").with_source(e)
                })?;
        let stdout = String::from_utf8_lossy(&output.stdout);
        let findings = amcheck_findings(&stdout);
        if !output.status.success() && findings.is_empty() {
            let stderr = String::from_utf8_lossy(&output.stderr);
            return Err(error(format!(
                "pg_amcheck failed ({}) without naming a corrupt relation: {}",
                output.status,
                stderr.lines().rev().take(5).collect::<Vec<_>>().join(" / ")
            )));
        }
        Ok(findings)
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
            // An interrupt's `seize_all` took it over (and `stop_seized` reaps it).
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
        if let Some(uid) = self.dedicated_uid {
            let killed = kill_strays(uid);
            if !killed.is_empty() {
                tracing::warn!(
                    "stopped {} process(es) the drill's scratch cluster left running as '{SCRATCH_USER}' (pids {killed:?}): code in the restored backup started them",
                    killed.len()
                );
            }
        }
        let _ = std::fs::remove_dir_all(self.dir.path());
    }
}

/// Removes the scratch directories in `base` left by drills that were killed (their lock
/// is free), first stopping a postmaster still running in one; says what it removed.
fn remove_abandoned(base: &Path) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(base) else {
        return Vec::new();
    };
    let mut said = Vec::new();
    for entry in entries.filter_map(std::result::Result::ok) {
        let name = entry.file_name();
        if !name.to_string_lossy().starts_with(PREFIX) {
            continue;
        }
        let path = entry.path();
        let Ok(dir) = rustix::fs::open(&path, DIRECTORY_NOFOLLOW, rustix::fs::Mode::empty()) else {
            continue;
        };
        let owner = rustix::fs::openat(
            &dir,
            OWNER_FILE,
            rustix::fs::OFlags::RDONLY | rustix::fs::OFlags::NOFOLLOW | rustix::fs::OFlags::CLOEXEC,
            rustix::fs::Mode::empty(),
        );
        let Ok(owner) = owner else {
            continue;
        };
        if rustix::fs::flock(&dir, rustix::fs::FlockOperation::NonBlockingLockExclusive).is_err() {
            continue;
        }
        let mut was = String::new();
        let _ = std::io::Read::read_to_string(
            &mut std::io::Read::take(std::fs::File::from(owner), 200),
            &mut was,
        );
        let stopped = stop_abandoned_postmaster(&path);
        if std::fs::remove_dir_all(&path).is_ok() {
            said.push(format!(
                "removed the scratch directory '{}' of a drill that was stopped before it ended ({}){stopped}",
                path.display(),
                was.trim()
            ));
        }
    }
    said
}

/// Stops (immediate shutdown, then SIGKILL after 10 s) the postmaster still running in the
/// abandoned scratch directory `dir`, if its pid file names one whose command line is that
/// directory's; says so.
fn stop_abandoned_postmaster(dir: &Path) -> String {
    let Ok(pid_file) = std::fs::read_to_string(dir.join("data").join("postmaster.pid")) else {
        return String::new();
    };
    let Some(pid) = pid_file
        .lines()
        .next()
        .and_then(|line| line.trim().parse::<i32>().ok())
        .filter(|pid| *pid > 1)
    else {
        return String::new();
    };
    let is_its_postmaster = std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|cmdline| {
        let data = dir.join("data");
        cmdline
            .split(|b| *b == 0)
            .any(|arg| arg == data.as_os_str().as_encoded_bytes())
    });
    if !is_its_postmaster {
        return String::new();
    }
    // SAFETY: kill(2) on a pid whose command line names the abandoned directory.
    unsafe { libc::kill(pid, libc::SIGQUIT) };
    let deadline = Instant::now() + Duration::from_secs(10);
    while Path::new(&format!("/proc/{pid}")).exists() {
        if Instant::now() > deadline {
            // SAFETY: as above.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    format!("; stopped its postmaster, pid {pid}")
}

fn as_owner(command: &mut Command, owner: Option<(u32, u32)>) {
    if let Some((uid, gid)) = owner {
        command.uid(uid).gid(gid);
    }
}

/// pg_amcheck's report, one finding per corrupt relation (or block of one): the line that
/// names it (`heap table "db.public.t", block 0, offset 3:`) with the first line of what
/// is wrong.
pub fn amcheck_findings(report: &str) -> Vec<String> {
    // A cluster damaged throughout names thousands: the first ones and the count say enough.
    const SHOWN: usize = 50;
    let mut findings = Vec::new();
    let mut more = 0usize;
    let mut lines = report.lines().peekable();
    while let Some(line) = lines.next() {
        let named = line.starts_with("heap table ")
            || line.starts_with("btree index ")
            || line.starts_with("heap relation ");
        if !named {
            continue;
        }
        let detail = lines
            .peek()
            .filter(|next| next.starts_with(' '))
            .map(|next| next.trim().to_string());
        if findings.len() == SHOWN {
            more += 1;
            continue;
        }
        findings.push(match detail {
            Some(detail) => format!("{} {detail}", line.trim_end()),
            None => line.trim_end().to_string(),
        });
    }
    if more > 0 {
        findings.push(format!("and {more} more corrupt relation(s) or block(s)"));
    }
    findings
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn amcheck_names_each_corrupt_relation_and_block() {
        let report = "heap table \"app.public.orders\", block 0, offset 3:\n    xmin 4294967295 equals or exceeds next valid transaction ID 0:754\nbtree index \"app.public.orders_pkey\":\n    ERROR:  heap tuple (0,3) from table \"orders\" lacks matching index tuple\n";
        assert_eq!(
            amcheck_findings(report),
            [
                "heap table \"app.public.orders\", block 0, offset 3: xmin 4294967295 equals or exceeds next valid transaction ID 0:754",
                "btree index \"app.public.orders_pkey\": ERROR:  heap tuple (0,3) from table \"orders\" lacks matching index tuple",
            ]
        );
        assert!(amcheck_findings("").is_empty());
    }
}
