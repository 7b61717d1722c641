//! Decoding a staged object while it is still being downloaded, never ahead of its checks:
//! the download writes the stored bytes into a staged file and says how far they matched
//! their block digests; a [`FollowingReader`] reads the same file up to that point and waits
//! for more. Nothing unchecked is ever read.

use std::io::{self, Read};
use std::sync::{Arc, Condvar, Mutex};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Downloading,
    /// Every byte is written and checked.
    Complete,
    /// The download failed: the reader stops with an error.
    Failed,
    /// The reader gave up: the download stops.
    Abandoned,
}

#[derive(Debug)]
struct Progress {
    checked: u64,
    state: State,
    /// How long the reader waited for the download.
    waited: std::time::Duration,
}

/// How far a staged file is checked, shared by its download and its reader.
#[derive(Debug, Clone)]
pub struct Checked(Arc<(Mutex<Progress>, Condvar)>);

impl Default for Checked {
    fn default() -> Checked {
        Checked(Arc::new((
            Mutex::new(Progress {
                checked: 0,
                state: State::Downloading,
                waited: std::time::Duration::ZERO,
            }),
            Condvar::new(),
        )))
    }
}

impl Checked {
    fn update(&self, change: impl FnOnce(&mut Progress)) {
        let (progress, changed) = &*self.0;
        change(&mut progress.lock().expect("progress lock"));
        changed.notify_all();
    }

    /// The first `bytes` of the file are written, flushed to it and checked.
    pub fn advance(&self, bytes: u64) {
        self.update(|p| p.checked = p.checked.max(bytes));
    }

    /// The whole file is written and checked, `size` bytes.
    pub fn complete(&self, size: u64) {
        self.update(|p| {
            p.checked = size;
            p.state = State::Complete;
        });
    }

    /// The download failed; what it wrote must not be read further.
    pub fn fail(&self) {
        self.update(|p| {
            if p.state == State::Downloading {
                p.state = State::Failed;
            }
        });
    }

    /// The reader stopped; the download need not go on.
    pub fn abandon(&self) {
        self.update(|p| {
            if p.state == State::Downloading {
                p.state = State::Abandoned;
            }
        });
    }

    pub fn is_abandoned(&self) -> bool {
        self.0.0.lock().expect("progress lock").state == State::Abandoned
    }

    /// Whether the download failed (its check did) or the reader gave up: nothing more
    /// written will be read.
    pub fn is_stopped(&self) -> bool {
        matches!(
            self.0.0.lock().expect("progress lock").state,
            State::Failed | State::Abandoned
        )
    }

    /// How long the reader waited for bytes to be checked: the part of its time that was
    /// the download's, not its own.
    pub fn waited(&self) -> std::time::Duration {
        self.0.0.lock().expect("progress lock").waited
    }

    /// Waits until bytes past `at` are checked; returns how many there are from `at`, or 0
    /// at the end of a complete file.
    fn wait_past(&self, at: u64) -> io::Result<u64> {
        let (progress, changed) = &*self.0;
        let mut progress = progress.lock().expect("progress lock");
        loop {
            if progress.checked > at {
                return Ok(progress.checked - at);
            }
            match progress.state {
                State::Downloading => {
                    let since = std::time::Instant::now();
                    progress = changed.wait(progress).expect("progress lock");
                    progress.waited += since.elapsed();
                }
                State::Complete => return Ok(0),
                State::Failed | State::Abandoned => {
                    return Err(io::Error::other(
                        "the download of the object stopped before its end",
                    ));
                }
            }
        }
    }
}

/// Reads a staged file only as far as [`Checked`] says it is checked, waiting for the rest.
pub struct FollowingReader<R> {
    file: R,
    checked: Checked,
    at: u64,
}

impl<R: Read> FollowingReader<R> {
    pub fn new(file: R, checked: Checked) -> FollowingReader<R> {
        FollowingReader {
            file,
            checked,
            at: 0,
        }
    }
}

impl<R: Read> Read for FollowingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let ready = self.checked.wait_past(self.at)?;
        let want = buf.len().min(usize::try_from(ready).unwrap_or(usize::MAX));
        let n = self.file.read(&mut buf[..want])?;
        if n == 0 && want > 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the staged file is shorter than what was checked of it",
            ));
        }
        self.at += n as u64;
        Ok(n)
    }
}

/// Part of a range had arrived before.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Overlap;

/// Which bytes of a file written out of order have arrived: the ranges written so far,
/// merged, and so how far it is whole from its first byte.
#[derive(Debug, Default)]
pub struct Arrived {
    /// Start to end (exclusive) of each run of arrived bytes; runs neither touch nor overlap.
    runs: std::collections::BTreeMap<u64, u64>,
}

impl Arrived {
    /// How many bytes from the first have all arrived.
    pub fn prefix(&self) -> u64 {
        self.runs.get(&0).copied().unwrap_or(0)
    }

    /// Notes that `range` arrived; the new prefix when it grew. Err: some of it had already
    /// arrived.
    pub fn add(&mut self, range: std::ops::Range<u64>) -> Result<Option<u64>, Overlap> {
        if range.is_empty() {
            return Ok(None);
        }
        let before = self.prefix();
        let (mut start, mut end) = (range.start, range.end);
        if let Some((&prior_start, &prior_end)) = self.runs.range(..=start).next_back() {
            if prior_end > start {
                return Err(Overlap);
            }
            if prior_end == start {
                start = prior_start;
            }
        }
        if let Some((&next_start, &next_end)) = self.runs.range(range.start..).next() {
            if next_start < end {
                return Err(Overlap);
            }
            if next_start == end {
                self.runs.remove(&next_start);
                end = next_end;
            }
        }
        self.runs.insert(start, end);
        let after = self.prefix();
        Ok((after > before).then_some(after))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arrived_ranges_merge_into_a_prefix_and_overlaps_are_refused() {
        let mut arrived = Arrived::default();
        assert_eq!(arrived.add(10..20), Ok(None));
        assert_eq!(arrived.add(30..40), Ok(None));
        assert_eq!(arrived.add(15..25), Err(Overlap));
        assert_eq!(arrived.add(5..11), Err(Overlap));
        assert_eq!(arrived.add(0..10), Ok(Some(20)));
        assert_eq!(arrived.add(20..30), Ok(Some(40)));
        assert_eq!(arrived.add(39..41), Err(Overlap));
        assert_eq!(arrived.add(40..40), Ok(None));
        assert_eq!(arrived.runs.len(), 1);
        assert_eq!(arrived.prefix(), 40);
    }

    #[test]
    fn nothing_past_the_checked_point_is_read_and_a_failed_download_is_an_error() {
        let data: Vec<u8> = (0..100u8).collect();
        let checked = Checked::default();
        let reader_side = checked.clone();
        let source = data.clone();
        let reader = std::thread::spawn(move || {
            let mut reader = FollowingReader::new(&source[..], reader_side);
            let mut seen = Vec::new();
            let mut buf = [0u8; 64];
            loop {
                match reader.read(&mut buf) {
                    Ok(0) => return Ok(seen),
                    Ok(n) => seen.push(n),
                    Err(e) => return Err((seen, e)),
                }
            }
        });
        checked.advance(30);
        checked.fail();
        let (seen, _) = reader.join().unwrap().unwrap_err();
        assert_eq!(seen, vec![30]);

        let checked = Checked::default();
        checked.advance(40);
        checked.complete(100);
        let mut all = Vec::new();
        FollowingReader::new(&data[..], checked)
            .read_to_end(&mut all)
            .unwrap();
        assert_eq!(all, data);
    }
}
