//! What the binary writes: reports on stdout (text or JSON), errors on stderr as a chain
//! with hints. A reader that went away ends the output, never the process.

use std::process::ExitCode;

use lifeboat::Error;

use super::args::OutputFormat;

// Everything printed goes through `emit`: a reader that went away (`lifeboat show … | head`)
// ends the output, never the process with a panic, and the exit code still says how the
// command went.
macro_rules! print {
    ($($arg:tt)*) => { $crate::cli::render::emit(format_args!($($arg)*)) };
}
macro_rules! println {
    ($($arg:tt)*) => { $crate::cli::render::emit(format_args!("{}\n", format_args!($($arg)*))) };
}
// And stderr: a reader of the log that went away must not stop a backup halfway.
macro_rules! eprintln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr().lock(), $($arg)*);
    }};
}

pub fn emit(text: std::fmt::Arguments<'_>) {
    use std::io::Write as _;
    let mut out = std::io::stdout().lock();
    match out.write_fmt(text).and_then(|()| out.flush()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
            eprintln!("error: unable to write to stdout: {e}");
        }
        _ => {}
    }
}

pub fn report_error(error: &Error) -> ExitCode {
    print_error(error);
    ExitCode::from(error.kind().exit_code() as u8)
}

pub fn print_error(error: &Error) {
    use lifeboat::error::escape_controls;
    // A run stopped by a signal fails as a consequence; the interrupt's own line tells it.
    if lifeboat::interrupt::is_interrupted() {
        return;
    }
    let mut chain = error.chain().into_iter();
    if let Some(first) = chain.next() {
        eprintln!("error: {}", escape_controls(&first));
    }
    for cause in chain {
        eprintln!("caused by: {}", escape_controls(&cause));
    }
    for hint in error.hints() {
        eprintln!("hint: {}", escape_controls(hint));
    }
}

/// Prints a report. A reader that went away (`lifeboat list | head`) is no error of the
/// command's: its exit code still says how the command went.
pub fn report<T: std::fmt::Display + serde::Serialize>(report: &T, format: OutputFormat) {
    use std::io::Write as _;
    let mut out = std::io::stdout().lock();
    let written = match format {
        OutputFormat::Text => write!(out, "{report}"),
        OutputFormat::Json => writeln!(
            out,
            "{}",
            serde_json::to_string_pretty(report).expect("reports serialize")
        ),
    };
    match written.and_then(|()| out.flush()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
            eprintln!("error: unable to write the report to stdout: {e}");
        }
        _ => {}
    }
}
