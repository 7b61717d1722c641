//! WAL prefetch. PostgreSQL's restore_command asks for one segment at a time, one process
//! each, and replays nothing while it waits: from a distant S3 every segment costs its round
//! trips and one stream's bandwidth, and that, not the replay, bounds a physical restore.
//!
//! When `wal-fetch` has served a segment, it notes it in a spool beside the file PostgreSQL
//! asked for (`pg_wal/.lifeboat-prefetch`: the same filesystem, so a rename hands a file
//! over) and, unless one runs, starts `lifeboat wal-prefetch` in the background (its own
//! process group: it outlives the call). That pass fetches the `wal_prefetch` segments after
//! the one served last, several at once, and follows the calls as they note later segments
//! until none is left to fetch. Each segment is fetched, decoded and checked exactly as
//! `wal-fetch` checks what it serves, into a temp file that gets the segment's name only
//! once checked; the next calls take theirs by rename. Nothing unchecked ever has a
//! segment's name there.
//!
//! One pass runs at a time: it holds an `flock` on the spool's lock file, which says which
//! segments it fetches, so that a call for one of them waits for it instead of fetching it
//! twice. A pass killed leaves temp files; the next pass removes them. The spool holds at
//! most `wal_prefetch` segments and the ones being fetched: every call drops what recovery
//! will not ask for any more (segments up to the one served, other timelines), and
//! `recovery_end_command` removes the spool once recovery ends.

use std::fs;
use std::io::{self, Read, Seek, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use futures::StreamExt;
use rustix::fs::FlockOperation;

use super::{WalDestination, WalFetchOutcome, WalReader, WalSourceOptions};
use crate::config::Config;
use crate::error::{Error, ErrorKind, Result};
use crate::wal::{self, WalFile, WalFileKind};

/// The spool's name, in the directory of the file PostgreSQL asks for (`pg_wal`).
pub const SPOOL_NAME: &str = ".lifeboat-prefetch";
const LOCK_NAME: &str = ".lock";
/// The segment served last and its size, as `wal-fetch` noted it.
const SERVED_NAME: &str = ".served";
/// What `write_decoded` names its temp files: what a killed pass leaves behind.
pub(super) const TEMP_PREFIX: &str = ".lifeboat-wal-fetch-";
/// Segments one pass fetches at once: each is held whole in memory while it is decoded, so
/// this bounds the pass's memory (4 × 16 MiB for WAL that does not compress).
const FETCHES_AT_ONCE: usize = 4;
/// How often a call waiting for a pass looks for its segment.
const POLL: Duration = Duration::from_millis(5);
/// The longest a call waits for a pass to fetch its segment, or `--clear` for a pass to
/// end: a pass stuck on a stalled store must not hold up recovery or its end.
const PATIENCE: Duration = Duration::from_secs(60);

/// A spool of prefetched segments, as the calls with one set of options see it.
#[derive(Debug, Clone)]
pub struct Spool {
    dir: PathBuf,
    /// Which options (config, job, repositories, identity) fetched a segment is part of its
    /// name there: a call with other options (`--from` another repository, `--exclude` a
    /// compromised one) is never served what was read under the first ones.
    source: String,
}

/// What a pass fetches: the segments after `after` on its timeline, `depth` of them, with
/// the options `source` names.
#[derive(Debug, Clone)]
pub struct Pass {
    pub after: String,
    pub segment_size: u64,
    pub depth: u32,
    pub source: String,
}

/// The name of a set of options in a spool: the first 16 hex digits of the sha256 of them
/// and of what the config file says (a repository removed from it, another identity file).
pub fn source_key(config: &Path, source: &WalSourceOptions) -> String {
    use sha2::Digest;
    let mut hasher = sha2::Sha256::new();
    hasher.update(fs::read(config).unwrap_or_default());
    hasher.update([0]);
    let identity = source
        .identity_file
        .as_ref()
        .map(|path| std::path::absolute(path).unwrap_or_else(|_| path.clone()));
    let config = std::path::absolute(config).unwrap_or_else(|_| config.to_path_buf());
    for part in [
        Some(config.to_string_lossy().into_owned()),
        source.job.clone(),
        source.from.clone(),
        Some(source.exclude.join("\n")),
        identity.map(|path| path.to_string_lossy().into_owned()),
    ] {
        hasher.update(part.unwrap_or_default().as_bytes());
        hasher.update([0]);
    }
    hex::encode(&hasher.finalize()[..8])
}

impl Pass {
    /// The names of the segments it fetches, in order.
    fn segments(&self) -> Vec<String> {
        let Some(after) = WalFile::parse(&self.after).filter(|f| f.kind == WalFileKind::Segment)
        else {
            return Vec::new();
        };
        let Some(first) = after.segment(self.segment_size) else {
            return Vec::new();
        };
        (1..=u64::from(self.depth.min(crate::config::MAX_WAL_PREFETCH)))
            .map(|ahead| wal::segment_name(after.timeline, first + ahead, self.segment_size))
            .collect()
    }
}

impl Spool {
    /// The spool beside `dest`, the path PostgreSQL passes as %p, for the calls whose
    /// options `source` names.
    pub fn beside(dest: &Path, source: String) -> Spool {
        let parent = dest
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        Spool::at(parent.join(SPOOL_NAME), source)
    }

    pub fn at(dir: PathBuf, source: String) -> Spool {
        Spool { dir, source }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The pass that fetches the `depth` segments after `served` (of `segment_size` bytes)
    /// with this spool's options.
    pub fn pass_after(&self, served: &str, segment_size: u64, depth: u32) -> Pass {
        Pass {
            after: served.to_string(),
            segment_size,
            depth,
            source: self.source.clone(),
        }
    }

    /// Where a pass with this spool's options puts segment `name`.
    fn path_of(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.{}", self.source))
    }

    /// Whether the spool is a directory of its own: not a link to one elsewhere.
    fn is_real(&self) -> bool {
        fs::symlink_metadata(&self.dir).is_ok_and(|m| m.file_type().is_dir())
    }

    /// Hands `name` over to `dest` when a pass fetched it: its size. When a pass is fetching
    /// it now, waits for that pass first, for a while. None: fetch it yourself.
    pub fn take(&self, name: &str, dest: &Path) -> Option<u64> {
        if !self.is_real() {
            return None;
        }
        let spooled = self.path_of(name);
        let deadline = std::time::Instant::now() + PATIENCE;
        loop {
            // A link or anything but a plain file was not put there by a pass, nor a file of
            // another size than the segments served (a spool damaged after a pass wrote it).
            if let Ok(meta) = fs::symlink_metadata(&spooled)
                && meta.file_type().is_file()
            {
                let whole = wal::is_segment_size(meta.len())
                    && self.served().is_none_or(|(_, size)| size == meta.len());
                if !whole {
                    let _ = fs::remove_file(&spooled);
                    return None;
                }
                return match fs::rename(&spooled, dest) {
                    Ok(()) => fs::metadata(dest).ok().map(|m| m.len()),
                    Err(e) => {
                        tracing::debug!(spooled = %spooled.display(), "unable to take a prefetched segment: {e}");
                        None
                    }
                };
            }
            let fetching = |pass: &Pass| {
                pass.source == self.source && pass.segments().iter().any(|s| s == name)
            };
            match self.running_pass() {
                Some(pass) if fetching(&pass) && std::time::Instant::now() < deadline => {
                    std::thread::sleep(POLL)
                }
                _ => {
                    // The pass may have named it just before it let go of its lock.
                    if fs::symlink_metadata(&spooled).is_ok_and(|m| m.file_type().is_file()) {
                        continue;
                    }
                    return None;
                }
            }
        }
    }

    /// Drops what recovery will not ask for once it was served `served` (a segment): the
    /// segments up to it on its timeline, those more than `depth` past it (recovery went
    /// back), every other timeline's, and those fetched with other options.
    pub fn prune(&self, served: &WalFile, segment_size: u64, depth: u32) {
        let Some(upto) = served.segment(segment_size) else {
            return;
        };
        let Ok(entries) = fs::read_dir(&self.dir) else {
            return;
        };
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some((file, source)) = name
                .to_str()
                .and_then(|name| name.split_once('.'))
                .and_then(|(segment, source)| Some((WalFile::parse(segment)?, source)))
                .filter(|(f, _)| f.kind == WalFileKind::Segment)
            else {
                continue;
            };
            let stale = source != self.source
                || file.timeline != served.timeline
                || file
                    .segment(segment_size)
                    .is_none_or(|s| s <= upto || s > upto + u64::from(depth));
            if stale {
                let _ = fs::remove_file(entry.path());
            }
        }
    }

    /// Notes that `served` was served and, unless a pass runs (it will follow the note),
    /// starts one in a process of its own: `exe --config CONFIG wal-prefetch …` with
    /// `source`, fetching `depth` segments ahead. It is not waited for.
    pub fn start(
        &self,
        exe: &Path,
        config: &Path,
        source: &WalSourceOptions,
        served: &Pass,
    ) -> io::Result<()> {
        self.make()?;
        self.note_served(served)?;
        if self.running_pass().is_some() {
            return Ok(());
        }
        let mut command = std::process::Command::new(exe);
        command
            .arg("--quiet")
            .arg("--config")
            .arg(config)
            .arg("wal-prefetch")
            .arg("--spool")
            .arg(&self.dir)
            .arg("--depth")
            .arg(served.depth.to_string());
        if let Some(job) = &source.job {
            command.arg("--job").arg(job);
        }
        if let Some(from) = &source.from {
            command.arg("--from").arg(from);
        }
        for excluded in &source.exclude {
            command.arg("--exclude").arg(excluded);
        }
        if let Some(identity) = &source.identity_file {
            command
                .arg("--identity-file")
                .arg(std::path::absolute(identity).unwrap_or_else(|_| identity.clone()));
        }
        // Nothing of PostgreSQL's: a pass that fails says nothing, and the call that needs its
        // segment fetches it and says why. Its own process group: a signal to the server's
        // children does not cut a pass short in the middle of a rename.
        command
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .process_group(0);
        command.spawn().map(drop)
    }

    /// Writes which segment was served last (whole, by rename: a pass never reads half).
    fn note_served(&self, served: &Pass) -> io::Result<()> {
        let staged = self
            .dir
            .join(format!("{SERVED_NAME}.{}", std::process::id()));
        fs::write(
            &staged,
            format!("{} {} {}", served.after, served.segment_size, self.source),
        )?;
        fs::rename(&staged, self.dir.join(SERVED_NAME))
    }

    /// The segment served last and its size, when a call with this spool's options served
    /// it.
    fn served(&self) -> Option<(String, u64)> {
        let said = fs::read_to_string(self.dir.join(SERVED_NAME)).ok()?;
        let mut words = said.split_whitespace();
        let (name, size) = (words.next()?, words.next()?.parse().ok()?);
        (words.next()? == self.source).then(|| (name.to_string(), size))
    }

    /// Makes the spool, readable by this user alone, unless it is there.
    fn make(&self) -> io::Result<()> {
        match fs::DirBuilder::new().mode(0o700).create(&self.dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                if fs::symlink_metadata(&self.dir)?.file_type().is_dir() {
                    Ok(())
                } else {
                    Err(io::Error::other(format!(
                        "'{}' is not a directory",
                        self.dir.display()
                    )))
                }
            }
            Err(e) => Err(e),
        }
    }

    fn open_lock(&self) -> io::Result<fs::File> {
        fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .custom_flags(libc_nofollow())
            .open(self.dir.join(LOCK_NAME))
    }

    /// The pass that holds the spool's lock now, as it wrote itself into the lock file.
    fn running_pass(&self) -> Option<Pass> {
        if !self.is_real() {
            return None;
        }
        let mut lock = self.open_lock().ok()?;
        if rustix::fs::flock(&lock, FlockOperation::NonBlockingLockShared).is_ok() {
            return None;
        }
        let mut said = String::new();
        lock.read_to_string(&mut said).ok()?;
        let mut words = said.split_whitespace();
        Some(Pass {
            after: words.next()?.to_string(),
            segment_size: words.next()?.parse().ok()?,
            depth: words.next()?.parse().ok()?,
            source: words.next()?.to_string(),
        })
    }

    /// Takes the spool's lock; None when another pass holds it.
    fn lock(&self) -> io::Result<Option<fs::File>> {
        let lock = self.open_lock()?;
        // A call that looks whether a pass runs holds the lock shared for an instant.
        let mut tries = 0;
        while rustix::fs::flock(&lock, FlockOperation::NonBlockingLockExclusive).is_err() {
            tries += 1;
            if tries == 5 {
                return Ok(None);
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        Ok(Some(lock))
    }

    /// Says in the lock file which segments the pass holding it fetches now.
    fn describe(lock: &mut fs::File, pass: &Pass) -> io::Result<()> {
        lock.set_len(0)?;
        lock.rewind()?;
        write!(
            lock,
            "{} {} {} {}",
            pass.after, pass.segment_size, pass.depth, pass.source
        )
    }

    /// Whether the filesystem has room for what `pass` fetches twice over: segments fetched
    /// ahead must never be what fills the disk that recovery writes.
    fn has_room_for(&self, pass: &Pass) -> bool {
        let needed = 2 * u64::from(pass.depth) * pass.segment_size;
        match rustix::fs::statvfs(&self.dir) {
            Ok(stat) => {
                let free = stat.f_bavail.saturating_mul(stat.f_frsize);
                if free < needed {
                    tracing::debug!(free, needed, "too little room to fetch WAL ahead");
                }
                free >= needed
            }
            Err(_) => false,
        }
    }

    /// Removes what a killed pass left: its temp files.
    fn remove_temps(&self) {
        let Ok(entries) = fs::read_dir(&self.dir) else {
            return;
        };
        for entry in entries.flatten() {
            if entry.file_name().to_string_lossy().starts_with(TEMP_PREFIX) {
                let _ = fs::remove_file(entry.path());
            }
        }
    }

    /// Removes the spool, after the pass that may be running ends: recovery is over.
    pub fn clear(&self) -> io::Result<()> {
        match fs::symlink_metadata(&self.dir) {
            Ok(meta) if meta.file_type().is_dir() => {}
            Ok(_) => {
                return Err(io::Error::other(format!(
                    "'{}' is not a directory",
                    self.dir.display()
                )));
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e),
        }
        // A pass stuck on a stalled store must not hold up the end of recovery: once it had
        // its time, the spool goes from under it (its next rename fails).
        let lock = self.open_lock()?;
        let deadline = std::time::Instant::now() + PATIENCE;
        while rustix::fs::flock(&lock, FlockOperation::NonBlockingLockExclusive).is_err()
            && std::time::Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(50));
        }
        // A pass started just before (by the last call of recovery) may be making its lock
        // file as the spool goes: that is over within a few tries.
        let mut tries = 0;
        loop {
            match fs::remove_dir_all(&self.dir) {
                Err(e) if e.kind() == io::ErrorKind::DirectoryNotEmpty && tries < 20 => {
                    tries += 1;
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
                done => return done,
            }
        }
    }
}

fn libc_nofollow() -> i32 {
    rustix::fs::OFlags::NOFOLLOW.bits() as i32
}

/// Runs a pass, unless another holds the spool: fetches the `depth` segments after the one
/// served last that the spool lacks into it, several at once, again each time a call notes
/// a later one, until none is left to fetch. A segment the archive lacks, or that no
/// repository serves intact, is left out: the call that needs it fetches it and says why.
pub async fn run_pass(
    config: &Config,
    spool: &Spool,
    source: &WalSourceOptions,
    depth: u32,
) -> Result<()> {
    let locking = |e: io::Error| {
        Error::new(
            ErrorKind::Target,
            format!("unable to lock the WAL spool '{}'", spool.dir().display()),
        )
        .with_source(e)
    };
    if !spool.is_real() {
        return Ok(());
    }
    let mut reader = None;
    let mut tried = std::collections::HashSet::new();
    loop {
        let Some(mut lock) = spool.lock().map_err(locking)? else {
            return Ok(());
        };
        spool.remove_temps();
        let mut followed = None;
        while let Some((after, segment_size)) = spool.served() {
            followed = Some((after.clone(), segment_size));
            let pass = Pass {
                after,
                segment_size,
                depth,
                source: spool.source.clone(),
            };
            Spool::describe(&mut lock, &pass).map_err(locking)?;
            let wanted: Vec<String> = pass
                .segments()
                .into_iter()
                .filter(|name| !tried.contains(name))
                .filter(|name| fs::symlink_metadata(spool.path_of(name)).is_err())
                .collect();
            if wanted.is_empty() || !spool.has_room_for(&pass) {
                break;
            }
            if reader.is_none() {
                reader = Some(WalReader::open(config, source).await?);
            }
            let reader = reader.as_ref().expect("opened above");
            tried.extend(fetch_into(reader, spool, wanted).await);
        }
        drop(lock);
        // A call that noted a later segment while this pass was finishing saw it running
        // and started none: follow that note too.
        if spool.served() == followed {
            return Ok(());
        }
    }
}

/// Fetches `wanted` into the spool, several at once; the names of those not fetched.
async fn fetch_into(reader: &WalReader<'_>, spool: &Spool, wanted: Vec<String>) -> Vec<String> {
    let fetched: Vec<(String, Result<WalFetchOutcome>)> = futures::stream::iter(wanted)
        .map(|name| async move {
            let dest = WalDestination::Spooled(spool.path_of(&name));
            let outcome = reader.fetch(&name, &dest).await;
            (name, outcome)
        })
        .buffered(FETCHES_AT_ONCE)
        .collect()
        .await;
    let mut left_out = Vec::new();
    for (name, outcome) in fetched {
        match outcome {
            Ok(WalFetchOutcome::Fetched {
                repository,
                passed_over,
                ..
            }) if !passed_over.is_empty() => {
                // A copy passed over (damaged, unreachable) is news for the server's log:
                // the call that needs this segment fetches it and says so.
                let _ = fs::remove_file(spool.path_of(&name));
                tracing::debug!(%name, %repository, "left to wal-fetch: {}", passed_over.join("; "));
                left_out.push(name);
            }
            Ok(WalFetchOutcome::Fetched { repository, .. }) => {
                tracing::debug!(%name, %repository, "prefetched")
            }
            Ok(WalFetchOutcome::NotArchived) => {
                tracing::debug!(%name, "not archived (yet)");
                left_out.push(name);
            }
            Err(e) => {
                tracing::debug!(%name, "not prefetched: {}", e.chain().join(": "));
                left_out.push(name);
            }
        }
    }
    left_out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pass_names_the_segments_after_the_one_served_on_its_timeline() {
        let mb16 = 16 << 20;
        let pass = Pass {
            after: "0000000200000001000000FE".to_string(),
            segment_size: mb16,
            depth: 3,
            source: "k".to_string(),
        };
        assert_eq!(
            pass.segments(),
            [
                "0000000200000001000000FF",
                "000000020000000200000000",
                "000000020000000200000001"
            ]
        );
        let history = Pass {
            after: "00000002.history".to_string(),
            ..pass
        };
        assert!(history.segments().is_empty());
    }

    #[test]
    fn served_segments_other_timelines_and_other_options_leave_the_spool() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::at(dir.path().to_path_buf(), "k".to_string());
        let mb16 = 16 << 20;
        for name in [
            "000000010000000000000004.k",
            "000000010000000000000005.k",
            "000000010000000000000006.k",
            "00000001000000000000000A.k",
            "000000010000000000000007.other",
            "000000020000000000000007.k",
            ".lifeboat-wal-fetch-x",
        ] {
            fs::write(dir.path().join(name), b"x").unwrap();
        }
        let names = || fs::read_dir(dir.path()).unwrap().count();
        let served = WalFile::parse("000000010000000000000003").unwrap();
        spool.prune(&served, mb16, 8);
        assert_eq!(
            names(),
            5,
            "this timeline's and options' segments ahead, and the temp"
        );
        // Recovery went on to 5 (with a window of 1): 4, 5 and 0A are out of it.
        let served = WalFile::parse("000000010000000000000005").unwrap();
        spool.prune(&served, mb16, 1);
        let mut left: Vec<String> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(
            left,
            [".lifeboat-wal-fetch-x", "000000010000000000000006.k"]
        );
        spool.remove_temps();
        assert!(!dir.path().join(".lifeboat-wal-fetch-x").exists());
    }
}
