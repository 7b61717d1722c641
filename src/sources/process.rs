//! A child process as a source: its stdout is the stream, its stderr is drained concurrently
//! (a full stderr pipe would stall the child) and kept as a tail that errors quote. A non-zero
//! exit, or a signal, is an error; so is a consumer that stops reading, which kills the child.

use std::collections::VecDeque;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::Mutex;

use crate::error::{Error, ErrorKind, Result};

const STDERR_TAIL_LINES: usize = 20;
const COPY_BUFFER: usize = 256 * 1024;

/// The environment a child keeps: what finds programs, words messages and tells time.
/// Everything else lifeboat was given (a PostgreSQL password, cloud keys, a Redis password)
/// stays with lifeboat; what a child needs is handed to it by name.
const KEPT_ENVIRONMENT: [&str; 8] = [
    "PATH", "HOME", "USER", "LOGNAME", "LANG", "LANGUAGE", "TZ", "TMPDIR",
];

fn kept(name: &str, also: impl Fn(&str) -> bool) -> bool {
    KEPT_ENVIRONMENT.contains(&name) || name.starts_with("LC_") || also(name)
}

/// A server lifeboat starts (a scratch postmaster, redis-server, pg_ctl): the kept
/// environment alone. A check run inside a scratch server can read its environment.
pub fn server(program: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut command = Command::new(program);
    command.env_clear();
    command.envs(
        std::env::vars_os()
            .filter(|(name, _)| name.to_str().is_some_and(|name| kept(name, |_| false))),
    );
    command
}

/// Adds the storage credentials lifeboat was given in its environment (`AWS_*`), for a
/// server whose `restore_command` or `archive_command` runs lifeboat against the
/// repositories.
pub fn pass_storage_credentials(command: &mut Command) {
    command.envs(
        std::env::vars_os()
            .filter(|(name, _)| name.to_str().is_some_and(|name| name.starts_with("AWS_"))),
    );
}

/// A client tool lifeboat runs to its end (pg_dump, pg_restore, psql): the kept
/// environment and libpq's own settings but the password (tools get a private passfile),
/// in a process group of its own that dies with lifeboat: SIGKILL when lifeboat dies,
/// however it dies, and the whole group when an interrupt stops the run (pg_restore
/// `--jobs` forks workers of its own).
pub fn tool(program: impl AsRef<std::ffi::OsStr>) -> Command {
    tool_dying_by(program, libc::SIGKILL)
}

/// The name a guard (`tool_with_workers`) runs under, as its `$0`.
const GUARD_NAME: &str = "lifeboat-guard";

/// A client tool that forks workers of its own (pg_restore `--jobs`), which do not inherit
/// the signal that kills it when lifeboat dies: it runs under a shell that leads its
/// process group, gets SIGTERM when lifeboat dies, and then kills the whole group.
pub fn tool_with_workers(program: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut command = tool_dying_by("/bin/sh", libc::SIGTERM);
    command
        .arg("-c")
        // An asynchronous command's stdin is /dev/null before its own redirections: it
        // gets lifeboat's pipe through descriptor 3.
        .arg("exec 3<&0; trap 'kill -KILL 0' TERM; \"$@\" <&3 3<&- & wait $!")
        .arg(GUARD_NAME)
        .arg(program.as_ref());
    command
}

fn tool_dying_by(program: impl AsRef<std::ffi::OsStr>, death_signal: i32) -> Command {
    let mut command = Command::new(program);
    command.env_clear();
    command.envs(std::env::vars_os().filter(|(name, _)| {
        name.to_str()
            .is_some_and(|name| kept(name, |name| name.starts_with("PG") && name != "PGPASSWORD"))
    }));
    command.process_group(0);
    die_with_lifeboat(&mut command, death_signal);
    command
}

/// The kernel sends `death_signal` to the child when lifeboat dies, however it dies. Set
/// in the child after any change of user (which would clear it), and only for the thread
/// that spawns: lifeboat spawns from threads that live as long as it does.
pub fn die_with_lifeboat(command: &mut Command, death_signal: i32) {
    let parent = std::process::id() as libc::pid_t;
    // SAFETY: prctl and getppid are async-signal-safe; nothing here allocates.
    unsafe {
        command.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, death_signal) != 0 {
                return Err(io::Error::last_os_error());
            }
            // lifeboat died between fork and prctl: the signal will never come.
            if libc::getppid() != parent {
                libc::_exit(1);
            }
            Ok(())
        });
    }
}

/// The children running now, by pid: an interrupt kills them (and their process groups)
/// before it removes what they were writing into.
static RUNNING: Mutex<Vec<u32>> = Mutex::new(Vec::new());

fn running() -> std::sync::MutexGuard<'static, Vec<u32>> {
    RUNNING.lock().unwrap_or_else(|e| e.into_inner())
}

/// Kills every child started through this module that has not been reaped, with its
/// process group: an interrupt's step before its undos.
fn kill_all() -> Option<String> {
    for pid in running().drain(..) {
        // SAFETY: kill(2) on children this process started and has not reaped (a pid
        // leaves RUNNING before it is reaped, see `reap`). A child in its own group is
        // killed with the workers it forked; one in lifeboat's group only by its pid.
        unsafe {
            if libc::getpgid(pid as libc::pid_t) == pid as libc::pid_t {
                libc::kill(-(pid as libc::pid_t), libc::SIGKILL);
            }
            libc::kill(pid as libc::pid_t, libc::SIGKILL);
        }
    }
    None
}

/// Waits for `child` to exit, takes it out of RUNNING, then reaps it: until it is reaped
/// its pid cannot be reused, so an interrupt never kills a stranger.
fn reap(child: &mut std::process::Child) -> io::Result<std::process::ExitStatus> {
    if let Ok(Some(status)) = child.try_wait() {
        forget_pid(child.id());
        return Ok(status);
    }
    loop {
        // SAFETY: waitid on our own unreaped child, with WNOWAIT: it stays a zombie.
        let waited = unsafe {
            let mut info: libc::siginfo_t = std::mem::zeroed();
            libc::waitid(
                libc::P_PID,
                child.id(),
                &mut info,
                libc::WEXITED | libc::WNOWAIT,
            )
        };
        if waited == 0 {
            break;
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            // Reaped elsewhere (ECHILD): std knows its status or reports the error.
            break;
        }
    }
    forget_pid(child.id());
    child.wait()
}

fn forget_pid(pid: u32) {
    running().retain(|p| *p != pid);
}

fn spawn_registered(command: &mut Command) -> io::Result<std::process::Child> {
    // Before the child exists: an interrupt from now on kills it (waiting on RUNNING while
    // it starts).
    crate::interrupt::at_interrupt(crate::interrupt::Step::Kill, kill_all);
    let mut running = running();
    let child = command.spawn()?;
    running.push(child.id());
    Ok(child)
}

/// Runs `command` to its end and returns what it wrote, like `Command::output`, killed
/// with the run if the run is interrupted.
pub fn output(command: &mut Command) -> io::Result<std::process::Output> {
    let mut child = spawn_registered(
        command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped()),
    )?;
    let (mut stdout, mut stderr) = (child.stdout.take(), child.stderr.take());
    let err_reader = std::thread::spawn(move || {
        let mut text = Vec::new();
        if let Some(stderr) = stderr.as_mut() {
            let _ = stderr.read_to_end(&mut text);
        }
        text
    });
    let mut out = Vec::new();
    if let Some(stdout) = stdout.as_mut() {
        let _ = stdout.read_to_end(&mut out);
    }
    let status = reap(&mut child)?;
    let err = err_reader.join().unwrap_or_default();
    Ok(std::process::Output {
        status,
        stdout: out,
        stderr: err,
    })
}

/// What went wrong with a child, for the caller to word as "unable to <action>".
#[derive(Debug)]
pub struct ChildFailure {
    pub status: String,
    pub stderr: String,
}

impl std::fmt::Display for ChildFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.stderr.is_empty() {
            write!(f, "{}", self.status)
        } else {
            write!(f, "{}; its stderr said:\n{}", self.status, self.stderr)
        }
    }
}

impl std::error::Error for ChildFailure {}

fn drain_stderr(
    stderr: impl Read + Send + 'static,
    program: String,
) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut tail = VecDeque::with_capacity(STDERR_TAIL_LINES);
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            tracing::debug!(program = %program, "{line}");
            if tail.len() == STDERR_TAIL_LINES {
                tail.pop_front();
            }
            tail.push_back(line);
        }
        tail.into_iter().collect::<Vec<_>>().join("\n")
    })
}

fn program_name(command: &Command) -> String {
    let guarded = command
        .get_args()
        .nth(2)
        .is_some_and(|name| name == GUARD_NAME);
    let program = match guarded {
        true => command.get_args().nth(3).unwrap_or_default(),
        false => command.get_program(),
    };
    std::path::Path::new(program)
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// Starts `command` with stderr piped and drained into a tail; the other streams as set.
fn spawn(
    command: &mut Command,
    action: &str,
    program: &str,
) -> Result<(std::process::Child, std::thread::JoinHandle<String>)> {
    let mut child = spawn_registered(command.stderr(Stdio::piped())).map_err(|e| {
        Error::new(
            ErrorKind::Source,
            format!("unable to {action}: cannot start {program}"),
        )
        .with_source(e)
    })?;
    let stderr = drain_stderr(child.stderr.take().expect("piped"), program.to_string());
    Ok((child, stderr))
}

fn wait(
    child: &mut std::process::Child,
    action: &str,
    program: &str,
) -> Result<std::process::ExitStatus> {
    reap(child).map_err(|e| {
        Error::new(
            ErrorKind::Source,
            format!("unable to {action}: cannot wait for {program}"),
        )
        .with_source(e)
    })
}

/// "unable to {action}", caused by the child's exit status and the tail of its stderr.
fn child_failed(kind: ErrorKind, action: &str, status: String, stderr: String) -> Error {
    Error::new(kind, format!("unable to {action}")).with_source(ChildFailure { status, stderr })
}

/// Stops a server this process started: `signal` (its clean, fast shutdown), then SIGKILL
/// if it has not exited within `grace`; reaped either way.
pub fn stop_child(child: &mut std::process::Child, signal: i32, grace: std::time::Duration) {
    // SAFETY: kill(2) on the pid of a child this process started and has not reaped.
    unsafe {
        libc::kill(child.id() as i32, signal);
    }
    let deadline = std::time::Instant::now() + grace;
    while std::time::Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// Runs `command`, copying its stdout into `out`; returns the bytes copied. `action` words
/// the error: "unable to {action}".
pub fn stream_stdout(mut command: Command, action: &str, out: &mut dyn Write) -> Result<u64> {
    let program = program_name(&command);
    command.stdin(Stdio::null()).stdout(Stdio::piped());
    let (mut child, stderr) = spawn(&mut command, action, &program)?;
    let mut stdout = child.stdout.take().expect("piped");
    let copied = match copy_all(&mut stdout, out) {
        Ok(copied) => copied,
        Err(e) => {
            // The consumer failed (a repository stopped): the child must not run on unread.
            let _ = child.kill();
            let _ = reap(&mut child);
            let _ = stderr.join();
            return Err(
                Error::new(ErrorKind::Storage, format!("unable to {action}")).with_source(e),
            );
        }
    };
    drop(stdout);
    let status = wait(&mut child, action, &program)?;
    let stderr_tail = stderr.join().unwrap_or_default();
    if !status.success() {
        let status = format!("{program} failed ({status})");
        return Err(child_failed(ErrorKind::Source, action, status, stderr_tail));
    }
    Ok(copied)
}

/// The stdin of a child being fed. A child that stops reading and exits successfully has
/// taken all it needs, so the rest is discarded (the feed still runs to its end, to check
/// what it fed); a child that stops reading and fails ends the feed with its failure.
struct ChildInput<'a> {
    stdin: Option<std::process::ChildStdin>,
    child: &'a mut std::process::Child,
    failed: Option<std::process::ExitStatus>,
}

impl Write for ChildInput<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let Some(stdin) = self.stdin.as_mut() else {
            return Ok(buf.len());
        };
        match stdin.write(buf) {
            Err(e) if e.kind() == io::ErrorKind::BrokenPipe => {
                self.stdin = None;
                let status = reap(self.child)?;
                if status.success() {
                    return Ok(buf.len());
                }
                self.failed = Some(status);
                Err(e)
            }
            other => other,
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        self.stdin.as_mut().map_or(Ok(()), |stdin| stdin.flush())
    }
}

/// Copies `reader` into `writer` in large blocks (`io::copy` moves 8 KiB at a time between
/// trait objects, a system call and a decoder call each).
pub fn copy_all(reader: &mut dyn Read, writer: &mut dyn Write) -> io::Result<u64> {
    let mut buffer = vec![0u8; COPY_BUFFER];
    let mut copied = 0u64;
    loop {
        let n = match reader.read(&mut buffer) {
            Ok(0) => return Ok(copied),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        writer.write_all(&buffer[..n])?;
        copied += n as u64;
    }
}

/// Asks for a 1 MiB pipe instead of the default 64 KiB, so a child reading in large gulps
/// wakes the writer less often. Best effort: the pipe works either way.
fn widen_pipe(pipe: &impl std::os::fd::AsRawFd) {
    // SAFETY: F_SETPIPE_SZ on a pipe descriptor this process owns; failure is harmless.
    unsafe {
        libc::fcntl(
            pipe.as_raw_fd(),
            libc::F_SETPIPE_SZ,
            COPY_BUFFER as libc::c_int * 4,
        );
    }
}

/// Runs `command` with `feed` writing its stdin. A failing child is the error, quoting its
/// stderr; otherwise the feed's own outcome is returned for the caller to word. A feed that
/// fails kills the child: what it was given so far must not be taken as the whole.
pub fn run_with_stdin<T, E>(
    mut command: Command,
    action: &str,
    feed: impl FnOnce(&mut dyn Write) -> std::result::Result<T, E>,
) -> Result<std::result::Result<T, E>> {
    let program = program_name(&command);
    command.stdin(Stdio::piped()).stdout(Stdio::null());
    let (mut child, stderr) = spawn(&mut command, action, &program)?;
    let stdin = child.stdin.take();
    if let Some(pipe) = &stdin {
        widen_pipe(pipe);
    }
    let mut input = ChildInput {
        stdin,
        child: &mut child,
        failed: None,
    };
    let fed = feed(&mut input);
    let failed = input.failed;
    drop(input);
    if fed.is_err() && failed.is_none() {
        let _ = child.kill();
    }
    let status = wait(&mut child, action, &program)?;
    let stderr_tail = stderr.join().unwrap_or_default();
    let failed = match failed {
        Some(status) => Some(status),
        None if fed.is_ok() && !status.success() => Some(status),
        None => None,
    };
    if let Some(status) = failed {
        let status = format!("{program} failed ({status})");
        return Err(child_failed(ErrorKind::Target, action, status, stderr_tail));
    }
    Ok(fed)
}

/// Runs `command` to completion, returning its stdout; a failure quotes its stderr.
pub fn run(mut command: Command, action: &str) -> Result<String> {
    let program = program_name(&command);
    let output = output(&mut command).map_err(|e| {
        Error::new(
            ErrorKind::Source,
            format!("unable to {action}: cannot start {program}"),
        )
        .with_source(e)
    })?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        let tail: Vec<&str> = stderr.lines().rev().take(STDERR_TAIL_LINES).collect();
        let status = format!("{program} failed ({})", output.status);
        let tail = tail.into_iter().rev().collect::<Vec<_>>().join("\n");
        return Err(child_failed(ErrorKind::Source, action, status, tail));
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stdout_is_streamed_and_a_failure_quotes_stderr() {
        let mut out = Vec::new();
        let mut command = Command::new("sh");
        command.args([
            "-c",
            "printf hello; echo 'pg_dump: error: permission denied for table secret' >&2; exit 1",
        ]);
        let err = stream_stdout(command, "dump database 'app'", &mut out).unwrap_err();
        assert_eq!(out, b"hello");
        let chain = err.chain().join("\n");
        assert!(chain.contains("unable to dump database 'app'"), "{chain}");
        assert!(
            chain.contains("permission denied for table secret"),
            "{chain}"
        );
    }

    #[test]
    fn a_consumer_that_fails_kills_the_child() {
        struct Broken;
        impl Write for Broken {
            fn write(&mut self, _: &[u8]) -> io::Result<usize> {
                Err(io::Error::new(io::ErrorKind::BrokenPipe, "repository gone"))
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let mut command = Command::new("sh");
        command.args(["-c", "while true; do echo data; done"]);
        let started = std::time::Instant::now();
        let err = stream_stdout(command, "dump", &mut Broken).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Storage);
        assert!(started.elapsed() < std::time::Duration::from_secs(10));
    }

    fn shell(script: &str) -> Command {
        let mut command = Command::new("sh");
        command.args(["-c", script]);
        command
    }

    /// Feeds 64 MiB, far more than a pipe holds, in 1 MiB writes.
    fn feed_plenty(stdin: &mut dyn Write) -> io::Result<u64> {
        let block = vec![b'x'; 1024 * 1024];
        for _ in 0..64 {
            stdin.write_all(&block)?;
        }
        Ok(64 * 1024 * 1024)
    }

    #[test]
    fn a_guarded_tool_is_fed_its_stdin_and_named_by_its_own_name() {
        let mut command = tool_with_workers("sh");
        command.args(["-c", "wc -c; exit 3"]);
        let err = run_with_stdin(command, "count", feed_plenty).unwrap_err();
        let chain = err.chain().join("\n");
        assert!(chain.contains("sh failed (exit status: 3)"), "{chain}");
        // It fails unless it read every byte fed.
        let mut command = tool_with_workers("sh");
        command.args(["-c", "test \"$(wc -c)\" = 67108864"]);
        let fed = run_with_stdin(command, "count", feed_plenty).unwrap();
        assert_eq!(fed.unwrap(), 64 * 1024 * 1024);
    }

    #[test]
    fn stdin_is_fed_to_the_end() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        let command = shell(&format!("wc -c > '{}'", out.display()));
        let fed = run_with_stdin(command, "count", feed_plenty)
            .unwrap()
            .unwrap();
        assert_eq!(fed, 64 * 1024 * 1024);
        let counted = std::fs::read_to_string(&out).unwrap();
        assert_eq!(counted.trim(), (64 * 1024 * 1024).to_string());
    }

    #[test]
    fn a_child_that_succeeds_without_reading_everything_lets_the_feed_finish() {
        let command = shell("head -c 10 > /dev/null");
        let fed = run_with_stdin(command, "read a little", feed_plenty).unwrap();
        assert_eq!(fed.unwrap(), 64 * 1024 * 1024);
    }

    #[test]
    fn a_child_that_fails_midway_is_the_error_and_quotes_stderr() {
        let command = shell(
            "head -c 10 > /dev/null; echo 'pg_restore: error: role \"app\" does not exist' >&2; exit 1",
        );
        let err = run_with_stdin(command, "restore database 'app'", feed_plenty).unwrap_err();
        let chain = err.chain().join("\n");
        assert!(
            chain.contains("unable to restore database 'app'"),
            "{chain}"
        );
        assert!(chain.contains("role \"app\" does not exist"), "{chain}");
    }

    #[test]
    fn a_feed_that_fails_kills_the_child_and_is_returned() {
        let command = shell("exec sleep 60");
        let started = std::time::Instant::now();
        let fed = run_with_stdin(command, "restore", |stdin| {
            stdin.write_all(b"partial")?;
            Err::<(), io::Error>(io::Error::other("damaged object"))
        })
        .unwrap();
        assert_eq!(fed.unwrap_err().to_string(), "damaged object");
        assert!(started.elapsed() < std::time::Duration::from_secs(30));
    }
}
