//! What an interrupted restore or drill (SIGINT, SIGTERM) must not leave behind: scratch
//! clusters and staging directories. The work itself may be blocked in a child process and
//! cannot unwind in time, so a task of its own catches the signal, removes what is
//! registered here, and exits 130.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

static DIRECTORIES: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());
static INTERRUPTED: AtomicBool = AtomicBool::new(false);
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

/// The exit code of an interrupted run, as shells report a SIGINT.
pub const EXIT_INTERRUPTED: i32 = 130;

/// If the run was interrupted, waits for the cleanup and exits 130: the run's own failure
/// (a child that lost its scratch cluster) is a consequence, not the story.
pub fn exit_if_interrupted() {
    if INTERRUPTED.load(Ordering::SeqCst) {
        drop(CLEANING.lock().unwrap_or_else(|e| e.into_inner()));
        std::process::exit(EXIT_INTERRUPTED);
    }
}

/// Starts the task that cleans up on SIGINT, SIGTERM or SIGHUP. Call once, inside the runtime.
pub fn install() {
    tokio::spawn(async {
        use tokio::signal::unix::{SignalKind, signal};
        let (Ok(mut interrupt), Ok(mut terminate), Ok(mut hangup)) = (
            signal(SignalKind::interrupt()),
            signal(SignalKind::terminate()),
            // The terminal went away (an SSH session dropped): the same clean stop.
            signal(SignalKind::hangup()),
        ) else {
            tracing::warn!(
                "unable to catch SIGINT/SIGTERM: an interrupted run may leave scratch files"
            );
            return;
        };
        tokio::select! {
            _ = interrupt.recv() => {}
            _ = terminate.recv() => {}
            _ = hangup.recv() => {}
        }
        let _ = tokio::task::spawn_blocking(|| {
            let _moving = hold_off();
            let cleaning = CLEANING.lock().unwrap_or_else(|e| e.into_inner());
            INTERRUPTED.store(true, Ordering::SeqCst);
            tracing::error!("interrupted: removing scratch clusters and staging directories");
            let clusters = crate::sources::postgres::take_scratch_clusters();
            crate::sources::process::kill_all();
            let undos = std::mem::take(&mut *UNDO.lock().unwrap_or_else(|e| e.into_inner()));
            for (_, undo) in undos {
                undo();
            }
            crate::sources::postgres::stop_scratch_clusters(clusters);
            crate::sources::redis::stop_all_scratch_servers();
            for dir in std::mem::take(&mut *directories()) {
                let _ = std::fs::remove_dir_all(dir);
            }
            drop(cleaning);
            std::process::exit(EXIT_INTERRUPTED);
        })
        .await;
    });
}
