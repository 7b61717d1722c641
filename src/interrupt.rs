//! What an interrupted run (SIGINT, SIGTERM, SIGHUP) must not leave behind: scratch
//! clusters and staging directories of a restore or drill, temp files and open multipart
//! uploads of a backup, prune, replicate, rekey or wal-push. The work itself may be blocked in
//! a child process and cannot unwind in time, so a task of its own catches the signal, undoes
//! what is registered here, logs one line saying so, and exits as a shell reports the signal:
//! 130 for SIGINT, 143 for SIGTERM, 129 for SIGHUP.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

static DIRECTORIES: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());
static FILES: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());
static INTERRUPTED: AtomicBool = AtomicBool::new(false);
thread_local! {
    /// Set on the thread that logs the interrupt's own line.
    static REPORTING: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Whether a log line may be written now: once the run is interrupted, only the interrupt's
/// own line is, so that what the stopped work fails with does not bury it.
pub fn may_log() -> bool {
    !INTERRUPTED.load(Ordering::SeqCst) || REPORTING.with(|r| r.get())
}

/// What the run finished before a signal came (a committed backup): the interrupt's line
/// says so, so that a stop after the commit point is not read as a lost backup.
static DONE: Mutex<Vec<String>> = Mutex::new(Vec::new());

/// Records that `what` is done for good ("backup conf/20261126T030000Z committed").
pub fn done(what: String) {
    DONE.lock().unwrap_or_else(|e| e.into_inner()).push(what);
}

/// When a teardown runs in an interrupt's cleanup. The steps run in this order, with the
/// registered undos between `Kill` and `Stop`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Step {
    /// Before any child is killed: a module takes over the scratch servers its owners would
    /// otherwise stop in a hurry once their clients die.
    Seize,
    /// The child processes.
    Kill,
    /// After the undos: the scratch servers seized before.
    Stop,
}

/// A module's part of the cleanup; what it returns ("2 scratch cluster(s) stopped") goes
/// into the interrupt's line.
pub type Teardown = fn() -> Option<String>;

static TEARDOWNS: Mutex<Vec<(Step, Teardown)>> = Mutex::new(Vec::new());

/// Has `teardown` run at `step` of an interrupt's cleanup. A module that starts processes
/// calls this as it starts one; calling it again changes nothing.
pub fn at_interrupt(step: Step, teardown: Teardown) {
    let mut teardowns = TEARDOWNS.lock().unwrap_or_else(|e| e.into_inner());
    if !teardowns
        .iter()
        .any(|(s, t)| *s == step && std::ptr::fn_addr_eq(*t, teardown))
    {
        teardowns.push((step, teardown));
    }
}

fn tear_down(step: Step) -> Vec<String> {
    let teardowns: Vec<Teardown> = TEARDOWNS
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .filter(|(s, _)| *s == step)
        .map(|(_, t)| *t)
        .collect();
    teardowns.into_iter().filter_map(|t| t()).collect()
}

/// The signal that interrupted the run, once one did.
static SIGNAL: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(0);
/// Held while the cleanup runs, so the run's own error path cannot exit before it is done.
static CLEANING: Mutex<()> = Mutex::new(());

fn directories() -> std::sync::MutexGuard<'static, Vec<PathBuf>> {
    DIRECTORIES.lock().unwrap_or_else(|e| e.into_inner())
}

/// Held while a restore moves its verified tree into place: an interrupt waits for the move
/// to end rather than leave the target half restored.
static MOVING: Mutex<()> = Mutex::new(());

/// Keeps an interrupt from cleaning up (and exiting) until the guard is dropped.
pub fn hold_off() -> std::sync::MutexGuard<'static, ()> {
    MOVING.lock().unwrap_or_else(|e| e.into_inner())
}

/// Removes `dir` if the run is interrupted, until `forget` is called for it.
pub fn remove_on_interrupt(dir: &Path) {
    directories().push(dir.to_path_buf());
}

pub fn forget(dir: &Path) {
    directories().retain(|d| d != dir);
}

/// Makes a directory with `make` and has it removed if the run is interrupted (`path` says
/// where `make` put it), with no moment between the two a signal could fall into: the
/// cleanup waits for a directory being made, and once the run is interrupted none is made.
pub fn make_dir_removed_on_interrupt<T>(
    make: impl FnOnce() -> std::io::Result<T>,
    path: impl FnOnce(&T) -> PathBuf,
) -> std::io::Result<T> {
    let Some(_creating) = creating() else {
        return Err(std::io::Error::new(
            std::io::ErrorKind::Interrupted,
            "the run is being interrupted",
        ));
    };
    let made = make()?;
    remove_on_interrupt(&path(&made));
    Ok(made)
}

fn files() -> std::sync::MutexGuard<'static, Vec<PathBuf>> {
    FILES.lock().unwrap_or_else(|e| e.into_inner())
}

/// Set once the cleanup took the temp files to remove: one registered later is removed at
/// once (its writer fails, which no longer matters).
static FILES_TAKEN: AtomicBool = AtomicBool::new(false);
/// Temp files being made and not yet registered; the cleanup waits for them.
static CREATING: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Held while a temp file is made and registered (see `creating`).
pub struct Creating(());

impl Drop for Creating {
    fn drop(&mut self) {
        CREATING.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Announces a temp file about to be made: None once the run is interrupted (make nothing
/// new), else a guard to hold until the file is registered with `remove_file_on_interrupt`.
pub fn creating() -> Option<Creating> {
    CREATING.fetch_add(1, Ordering::SeqCst);
    let guard = Creating(());
    (!INTERRUPTED.load(Ordering::SeqCst)).then_some(guard)
}

/// Removes the file `path` (a temp file being written) if the run is interrupted, until
/// `forget_file` is called for it.
pub fn remove_file_on_interrupt(path: &Path) {
    let mut files = files();
    if FILES_TAKEN.load(Ordering::SeqCst) {
        let _ = std::fs::remove_file(path);
        return;
    }
    files.push(path.to_path_buf());
}

pub fn forget_file(path: &Path) {
    files().retain(|f| f != path);
}

/// A temp file the interrupt cleanup removes while this lives (a signal ends the process
/// without running destructors); dropped once the file is renamed into place or gone.
pub struct RemovedOnInterrupt(PathBuf);

impl RemovedOnInterrupt {
    pub fn new(path: &Path) -> RemovedOnInterrupt {
        remove_file_on_interrupt(path);
        RemovedOnInterrupt(path.to_path_buf())
    }
}

impl Drop for RemovedOnInterrupt {
    fn drop(&mut self) {
        forget_file(&self.0);
    }
}

/// Work to undo that needs the network: an open multipart upload to abort, a claim to
/// release. Run, with a time limit, before the rest of the cleanup.
type AsyncUndo = Box<dyn FnOnce() -> futures::future::BoxFuture<'static, ()> + Send>;
static ASYNC_UNDO: Mutex<Vec<(u64, &'static str, AsyncUndo)>> = Mutex::new(Vec::new());

/// How long the cleanup waits for the network (aborting uploads) before it exits anyway:
/// systemd sends SIGKILL 90 s after SIGTERM by default.
const ASYNC_UNDO_LIMIT: std::time::Duration = std::time::Duration::from_secs(20);

/// Runs `undo` (what it does, for the log: "upload(s) aborted") if the run is interrupted while
/// the guard lives; dropping the guard forgets it.
#[must_use = "the undo is forgotten when the guard is dropped"]
pub struct AsyncUndoGuard(u64);

pub fn undo_async_on_interrupt(
    what: &'static str,
    undo: impl FnOnce() -> futures::future::BoxFuture<'static, ()> + Send + 'static,
) -> AsyncUndoGuard {
    let id = NEXT_UNDO.fetch_add(1, Ordering::SeqCst);
    ASYNC_UNDO
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push((id, what, Box::new(undo)));
    AsyncUndoGuard(id)
}

impl Drop for AsyncUndoGuard {
    fn drop(&mut self) {
        ASYNC_UNDO
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|(id, _, _)| *id != self.0);
    }
}

/// Work to undo if the run is interrupted, beyond files: a database a restore was loading
/// beside the live one. Run after the children are killed, before the files go.
type Undo = Box<dyn FnOnce() + Send>;
static UNDO: Mutex<Vec<(u64, Undo)>> = Mutex::new(Vec::new());
static NEXT_UNDO: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Runs `undo` if the run is interrupted while the guard lives; dropping it forgets `undo`.
#[must_use = "the undo is forgotten when the guard is dropped"]
pub struct UndoGuard(u64);

pub fn undo_on_interrupt(undo: impl FnOnce() + Send + 'static) -> UndoGuard {
    let id = NEXT_UNDO.fetch_add(1, Ordering::SeqCst);
    UNDO.lock()
        .unwrap_or_else(|e| e.into_inner())
        .push((id, Box::new(undo)));
    UndoGuard(id)
}

impl Drop for UndoGuard {
    fn drop(&mut self) {
        UNDO.lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|(id, _)| *id != self.0);
    }
}

/// The exit code of a run SIGINT interrupted, as shells report it (SIGTERM: 143).
pub const EXIT_INTERRUPTED: i32 = 130;

/// The exit code the run ends with, once interrupted: 128 + the signal's number.
pub fn exit_code() -> i32 {
    exit_code_of(SIGNAL.load(Ordering::SeqCst))
}

/// The exit code of a run `signal` ended: 128 + its number, as shells report it.
fn exit_code_of(signal: i32) -> i32 {
    if signal == 0 {
        EXIT_INTERRUPTED
    } else {
        128 + signal
    }
}

/// If the run was interrupted, waits for the cleanup and exits as the signal says: the run's
/// own failure (a child that lost its scratch cluster) is a consequence, not the story.
pub fn exit_if_interrupted() {
    if INTERRUPTED.load(Ordering::SeqCst) {
        // The cleanup task exits the process once it is done (uploads aborted over the
        // network first); this only ends a wait that went on too long.
        std::thread::sleep(ASYNC_UNDO_LIMIT * 3);
        drop(CLEANING.lock().unwrap_or_else(|e| e.into_inner()));
        std::process::exit(exit_code_of(SIGNAL.load(Ordering::SeqCst)));
    }
}

/// `exit_if_interrupted` for async code: waits without holding a runtime thread.
pub async fn end_if_interrupted() {
    if INTERRUPTED.load(Ordering::SeqCst) {
        tokio::time::sleep(ASYNC_UNDO_LIMIT * 3).await;
        exit_if_interrupted();
    }
}

pub fn is_interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

/// Starts the task that cleans up on SIGINT, SIGTERM or SIGHUP during `command` (for the
/// log line). Call once, inside the runtime.
pub fn install(command: String) {
    use tokio::signal::unix::{SignalKind, signal};
    // Registered here, before the task first runs: a signal from now on is caught.
    let (Ok(mut interrupt), Ok(mut terminate), Ok(mut hangup)) = (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
        // The terminal went away (an SSH session dropped): the same clean stop.
        signal(SignalKind::hangup()),
    ) else {
        tracing::warn!(
            "unable to catch SIGINT/SIGTERM: an interrupted run may leave temp files behind"
        );
        return;
    };
    tokio::spawn(async move {
        let (signo, name) = tokio::select! {
            _ = interrupt.recv() => (libc::SIGINT, "SIGINT"),
            _ = terminate.recv() => (libc::SIGTERM, "SIGTERM"),
            _ = hangup.recv() => (libc::SIGHUP, "SIGHUP"),
        };
        SIGNAL.store(signo, Ordering::SeqCst);
        INTERRUPTED.store(true, Ordering::SeqCst);
        let mut undone: std::collections::BTreeMap<&'static str, usize> = Default::default();
        // Until nothing is registered and nothing is being opened: an upload whose request
        // was in flight when the signal came registers its abort when the answer arrives (it
        // holds a `creating` guard until then). A run with nothing registered (a restore)
        // goes straight on to stop its children, as fast as the signal came.
        let deadline = tokio::time::Instant::now() + ASYNC_UNDO_LIMIT;
        loop {
            let undos = std::mem::take(&mut *ASYNC_UNDO.lock().unwrap_or_else(|e| e.into_inner()));
            if undos.is_empty() {
                if CREATING.load(Ordering::SeqCst) == 0 || tokio::time::Instant::now() > deadline {
                    break;
                }
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                continue;
            }
            let mut pending = Vec::new();
            for (_, what, undo) in undos {
                *undone.entry(what).or_default() += 1;
                pending.push(undo());
            }
            let _ = tokio::time::timeout_at(deadline, futures::future::join_all(pending)).await;
        }
        let _ = tokio::task::spawn_blocking(move || {
            let _moving = hold_off();
            let cleaning = CLEANING.lock().unwrap_or_else(|e| e.into_inner());
            let mut stopped = tear_down(Step::Seize);
            stopped.extend(tear_down(Step::Kill));
            let undos = std::mem::take(&mut *UNDO.lock().unwrap_or_else(|e| e.into_inner()));
            for (_, undo) in undos {
                undo();
            }
            stopped.extend(tear_down(Step::Stop));
            // Temp files and directories being made now are registered (and so removed)
            // within moments.
            let waited = std::time::Instant::now();
            while CREATING.load(Ordering::SeqCst) > 0
                && waited.elapsed() < std::time::Duration::from_secs(2)
            {
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            let directories = std::mem::take(&mut *directories());
            for dir in &directories {
                let _ = std::fs::remove_dir_all(dir);
            }
            let files = {
                let mut registered = files();
                FILES_TAKEN.store(true, Ordering::SeqCst);
                std::mem::take(&mut *registered)
            };
            for file in &files {
                let _ = std::fs::remove_file(file);
            }
            let mut cleaned: Vec<String> = undone
                .iter()
                .map(|(what, count)| format!("{count} {what}"))
                .collect();
            if !files.is_empty() {
                cleaned.push(format!("{} temp file(s) removed", files.len()));
            }
            cleaned.extend(stopped);
            if !directories.is_empty() {
                cleaned.push(format!(
                    "{} scratch or staging director(ies) removed",
                    directories.len()
                ));
            }
            let done = std::mem::take(&mut *DONE.lock().unwrap_or_else(|e| e.into_inner()));
            REPORTING.with(|r| r.set(true));
            tracing::error!(
                "{command} interrupted by {name}: {}{}; exiting {}",
                match done.is_empty() {
                    true => String::new(),
                    false => format!("done before it: {}; ", done.join(", ")),
                },
                match cleaned.is_empty() {
                    true => "nothing to clean up".to_string(),
                    false => cleaned.join(", "),
                },
                exit_code_of(signo)
            );
            drop(cleaning);
            std::process::exit(exit_code_of(signo));
        })
        .await;
    });
}
