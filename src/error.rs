//! The one public error of lifeboat. Every module keeps its own detailed error and converts
//! into this at its boundary; the `kind` decides the exit code and whether a retry can help.
//! Depends on nothing else in the crate.

use std::fmt;

/// What went wrong, in the terms an operator acts on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The config file is missing, unreadable or invalid.
    Config,
    /// The command line asks for something that cannot be done as asked.
    Usage,
    /// A data source (a path, a database, a child process) failed.
    Source,
    /// A repository could not be read or written.
    Storage,
    /// A backup, object or repository that was asked for does not exist.
    NotFound,
    /// Stored data does not match its manifest: damaged, truncated or tampered with.
    Verification,
    /// The restore target is unusable (not empty, not writable, unsafe entries).
    Target,
    /// The work was done, but not everywhere it should have been.
    Degraded,
    /// Another run of the same job holds its lock; nothing was done.
    Locked,
    /// An encrypted object cannot be decrypted: no identity, or none that matches.
    Key,
    /// This host's clock and a repository's disagree by more than `max_clock_skew`.
    Clock,
}

/// Stable process exit codes, documented in the README.
pub mod exit_code {
    pub const SUCCESS: i32 = 0;
    pub const FAILURE: i32 = 1;
    pub const USAGE: i32 = 2;
    pub const DEGRADED: i32 = 3;
    /// `wal-fetch` only: no repository could say whether it holds the file. Above 125, so
    /// PostgreSQL stops recovery instead of taking it for the end of the archive.
    pub const STOP_RECOVERY: i32 = 255;
    /// Another run of the job holds its lock (sysexits' EX_TEMPFAIL: try again later).
    pub const LOCKED: i32 = 75;
}

impl ErrorKind {
    pub fn exit_code(self) -> i32 {
        match self {
            ErrorKind::Config | ErrorKind::Usage => exit_code::USAGE,
            ErrorKind::Degraded => exit_code::DEGRADED,
            ErrorKind::Locked => exit_code::LOCKED,
            _ => exit_code::FAILURE,
        }
    }
}

type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// An error with a kind, a message in the form "unable to <verb> <object> '<name>'",
/// an optional cause, and hints that tell the operator what to do next.
#[derive(Debug)]
pub struct Error {
    kind: ErrorKind,
    message: String,
    hints: Vec<String>,
    source: Option<BoxError>,
}

impl Error {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Error {
            kind,
            message: message.into(),
            hints: Vec::new(),
            source: None,
        }
    }

    pub fn config(message: impl Into<String>) -> Self {
        Error::new(ErrorKind::Config, message)
    }

    pub fn usage(message: impl Into<String>) -> Self {
        Error::new(ErrorKind::Usage, message)
    }

    pub fn with_source(mut self, source: impl Into<BoxError>) -> Self {
        self.source = Some(source.into());
        self
    }

    pub fn with_hint(mut self, hint: impl Into<String>) -> Self {
        self.hints.push(hint.into());
        self
    }

    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    pub fn message(&self) -> &str {
        &self.message
    }

    pub fn hints(&self) -> &[String] {
        &self.hints
    }

    /// The message followed by every cause, joined the way an operator reads them.
    pub fn chain(&self) -> Vec<String> {
        let mut lines = vec![self.message.clone()];
        let mut cause: Option<&(dyn std::error::Error + 'static)> = self
            .source
            .as_deref()
            .map(|e| e as &(dyn std::error::Error + 'static));
        while let Some(err) = cause {
            let text = err.to_string();
            if lines.last() != Some(&text) {
                lines.push(text);
            }
            cause = err.source();
        }
        lines
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source
            .as_deref()
            .map(|e| e as &(dyn std::error::Error + 'static))
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Unicode's line and paragraph separators (which some viewers break lines at) and the
/// marks that reorder text on screen.
fn is_line_or_direction_mark(c: char) -> bool {
    matches!(c, '\u{2028}' | '\u{2029}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

/// `text` with its control characters escaped (`\n`, `\u{1b}`), so that a name taken from a
/// source or a repository (a file named "x\nERROR …") can neither start a line of its own in
/// a log, a report or an error message nor drive the terminal that shows it.
pub fn escape_controls(text: &str) -> std::borrow::Cow<'_, str> {
    if !text
        .chars()
        .any(|c| c.is_control() || is_line_or_direction_mark(c))
    {
        return std::borrow::Cow::Borrowed(text);
    }
    std::borrow::Cow::Owned(
        text.chars()
            .map(|c| match c {
                '\n' => "\\n".to_string(),
                '\r' => "\\r".to_string(),
                '\t' => "\\t".to_string(),
                c if c.is_control() || is_line_or_direction_mark(c) => {
                    format!("\\u{{{:x}}}", c as u32)
                }
                c => c.to_string(),
            })
            .collect(),
    )
}

#[cfg(test)]
mod escape_tests {
    use super::escape_controls;

    #[test]
    fn control_characters_are_escaped_and_plain_text_is_left_alone() {
        assert_eq!(escape_controls("plain 'name' ü"), "plain 'name' ü");
        assert_eq!(
            escape_controls("evil\nERROR forged\r\t\u{1b}[31m"),
            "evil\\nERROR forged\\r\\t\\u{1b}[31m"
        );
        assert_eq!(
            escape_controls("a\u{2028}b\u{202e}c"),
            "a\\u{2028}b\\u{202e}c"
        );
    }
}
