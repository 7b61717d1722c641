//! Progress of long transfers, reported through a small trait that the binary renders (a
//! progress bar on a terminal; nothing under a timer). The reporter is installed once per
//! process; without one, reporting costs nothing.

use std::io::{self, Read, Write};
use std::sync::OnceLock;

/// Renders progress; installed by the binary.
pub trait Progress: Send + Sync {
    /// Starts a task that moves `total` bytes, if known.
    fn start(&self, label: &str, total: Option<u64>) -> Box<dyn Task>;
}

pub trait Task: Send {
    fn advance(&mut self, bytes: u64);
    fn finish(self: Box<Self>);
}

struct Silent;

impl Task for Silent {
    fn advance(&mut self, _: u64) {}
    fn finish(self: Box<Self>) {}
}

static REPORTER: OnceLock<Box<dyn Progress>> = OnceLock::new();

/// Installs the process's reporter; later calls are ignored.
pub fn install(reporter: Box<dyn Progress>) {
    let _ = REPORTER.set(reporter);
}

pub fn start(label: &str, total: Option<u64>) -> Box<dyn Task> {
    match REPORTER.get() {
        Some(reporter) => reporter.start(label, total),
        None => Box::new(Silent),
    }
}

/// Counts the bytes written through it into a task.
pub struct CountingWriter<'a> {
    pub inner: &'a mut dyn Write,
    pub task: &'a mut dyn Task,
}

impl Write for CountingWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let written = self.inner.write(buf)?;
        self.task.advance(written as u64);
        Ok(written)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Counts the bytes read through it into a task.
pub struct CountingReader<'a> {
    pub inner: &'a mut dyn Read,
    pub task: &'a mut dyn Task,
}

impl Read for CountingReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let read = self.inner.read(buf)?;
        self.task.advance(read as u64);
        Ok(read)
    }
}
