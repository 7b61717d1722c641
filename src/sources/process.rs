//! A child process as a source: its stdout is the stream, its stderr is drained concurrently
//! (a full stderr pipe would stall the child) and kept as a tail that errors quote. A non-zero
//! exit, or a signal, is an error; so is a consumer that stops reading, which kills the child.

use std::collections::VecDeque;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::process::{Command, Stdio};

use crate::error::{Error, ErrorKind, Result};

const STDERR_TAIL_LINES: usize = 20;
const COPY_BUFFER: usize = 256 * 1024;

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
    std::path::Path::new(command.get_program())
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// Runs `command`, copying its stdout into `out`; returns the bytes copied. `action` words
/// the error: "unable to {action}".
pub fn stream_stdout(mut command: Command, action: &str, out: &mut dyn Write) -> Result<u64> {
    let program = program_name(&command);
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| {
            Error::new(
                ErrorKind::Source,
                format!("unable to {action}: cannot start {program}"),
            )
            .with_source(e)
        })?;
    let stderr = drain_stderr(child.stderr.take().expect("piped"), program.clone());
    let mut stdout = child.stdout.take().expect("piped");

    let mut buffer = vec![0u8; COPY_BUFFER];
    let mut copied = 0u64;
    let copy_result: io::Result<()> = loop {
        match stdout.read(&mut buffer) {
            Ok(0) => break Ok(()),
            Ok(n) => {
                if let Err(e) = out.write_all(&buffer[..n]) {
                    break Err(e);
                }
                copied += n as u64;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => break Err(e),
        }
    };
    if let Err(e) = copy_result {
        // The consumer failed (a repository stopped): the child must not run on unread.
        let _ = child.kill();
        let _ = child.wait();
        let _ = stderr.join();
        return Err(Error::new(ErrorKind::Storage, format!("unable to {action}")).with_source(e));
    }
    drop(stdout);
    let status = child.wait().map_err(|e| {
        Error::new(
            ErrorKind::Source,
            format!("unable to {action}: cannot wait for {program}"),
        )
        .with_source(e)
    })?;
    let stderr_tail = stderr.join().unwrap_or_default();
    if !status.success() {
        return Err(
            Error::new(ErrorKind::Source, format!("unable to {action}")).with_source(
                ChildFailure {
                    status: format!("{program} failed ({status})"),
                    stderr: stderr_tail,
                },
            ),
        );
    }
    Ok(copied)
}

/// Runs `command` to completion, returning its stdout; a failure quotes its stderr.
pub fn run(mut command: Command, action: &str) -> Result<String> {
    let program = program_name(&command);
    let output = command.stdin(Stdio::null()).output().map_err(|e| {
        Error::new(
            ErrorKind::Source,
            format!("unable to {action}: cannot start {program}"),
        )
        .with_source(e)
    })?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        let tail: Vec<&str> = stderr.lines().rev().take(STDERR_TAIL_LINES).collect();
        return Err(
            Error::new(ErrorKind::Source, format!("unable to {action}")).with_source(
                ChildFailure {
                    status: format!("{program} failed ({})", output.status),
                    stderr: tail.into_iter().rev().collect::<Vec<_>>().join("\n"),
                },
            ),
        );
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
}
