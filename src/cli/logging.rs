//! Logging to stderr, as text or JSON lines; progress bars on a terminal.

use std::io::IsTerminal;

use super::args::{Cli, LogFormat};
use super::terminal;

/// Logs go to stderr. On a terminal, long transfers also show progress bars there; under a
/// timer or a pipe nothing but the log lines is written.
pub fn init(cli: &Cli) {
    let default = match (cli.quiet, cli.verbose) {
        (true, _) => "error",
        (false, 0) => "lifeboat=info,warn",
        (false, 1) => "lifeboat=debug,info",
        (false, _) => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("LIFEBOAT_LOG")
        .unwrap_or_else(|_| default.into());
    let on_terminal = std::io::stderr().is_terminal();
    // A log write that fails (stderr a closed pipe) is dropped: the tracing crate's own
    // report of it would panic writing to the same stderr.
    use tracing_subscriber::fmt::writer::MakeWriterExt;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(on_terminal)
        .log_internal_errors(false);
    let progress = (on_terminal && !cli.quiet).then(terminal::TerminalProgress::new);
    match (cli.log_format, progress) {
        (LogFormat::Text, Some(progress)) => {
            lifeboat::progress::install(Box::new(progress.clone()));
            builder
                .with_target(false)
                .with_writer(terminal::Escaping(
                    progress.with_filter(|_| lifeboat::interrupt::may_log()),
                ))
                .init()
        }
        (LogFormat::Text, None) => builder
            .with_target(false)
            .with_writer(terminal::Escaping(
                std::io::stderr.with_filter(|_| lifeboat::interrupt::may_log()),
            ))
            .init(),
        // One object per line, the span fields (job, backup) flattened into each.
        (LogFormat::Json, _) => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(true)
            .with_writer(std::io::stderr.with_filter(|_| lifeboat::interrupt::may_log()))
            .init(),
    }
}
