//! Progress bars on a terminal, for the binary only. Log lines are printed above the bars
//! instead of through them.

use std::io::{self, Write};
use std::time::Duration;

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use lifeboat::progress::{Progress, Task};

#[derive(Clone)]
pub struct TerminalProgress {
    bars: MultiProgress,
}

impl TerminalProgress {
    pub fn new() -> TerminalProgress {
        TerminalProgress {
            bars: MultiProgress::with_draw_target(ProgressDrawTarget::stderr_with_hz(4)),
        }
    }
}

struct Bar(ProgressBar);

impl Progress for TerminalProgress {
    fn start(&self, label: &str, total: Option<u64>) -> Box<dyn Task> {
        let (bar, template) = match total {
            Some(total) => (
                ProgressBar::new(total),
                "{msg} {bar:30} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
            ),
            None => (
                ProgressBar::no_length(),
                "{msg} {spinner} {bytes} {bytes_per_sec} {elapsed}",
            ),
        };
        let bar = self.bars.add(bar);
        bar.set_style(ProgressStyle::with_template(template).expect("valid template"));
        bar.set_message(label.to_string());
        bar.enable_steady_tick(Duration::from_millis(250));
        Box::new(Bar(bar))
    }
}

impl Task for Bar {
    fn advance(&mut self, bytes: u64) {
        self.0.inc(bytes);
    }

    fn finish(self: Box<Self>) {
        self.0.finish_and_clear();
    }
}

impl Drop for Bar {
    fn drop(&mut self) {
        if !self.0.is_finished() {
            self.0.abandon();
        }
    }
}

/// A stderr writer for tracing that suspends the bars while a log line is written.
pub struct LogWriter {
    bars: MultiProgress,
}

impl Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.bars.suspend(|| io::stderr().write_all(buf))?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        io::stderr().flush()
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for TerminalProgress {
    type Writer = LogWriter;

    fn make_writer(&'a self) -> LogWriter {
        LogWriter {
            bars: self.bars.clone(),
        }
    }
}

/// Wraps a log writer so that each line is written with its control characters escaped
/// (see `escape_controls`) but the newline that ends it: a text log line is one line,
/// whatever names it carries.
pub struct Escaping<M>(pub M);

pub struct EscapingWriter<W>(W);

impl<W: Write> Write for EscapingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let text = String::from_utf8_lossy(buf);
        let (line, end) = match text.strip_suffix('\n') {
            Some(line) => (line, "\n"),
            None => (text.as_ref(), ""),
        };
        let escaped = lifeboat::error::escape_controls(line);
        self.0.write_all(format!("{escaped}{end}").as_bytes())?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.0.flush()
    }
}

impl<'a, M: tracing_subscriber::fmt::MakeWriter<'a>> tracing_subscriber::fmt::MakeWriter<'a>
    for Escaping<M>
{
    type Writer = EscapingWriter<M::Writer>;

    fn make_writer(&'a self) -> Self::Writer {
        EscapingWriter(self.0.make_writer())
    }

    fn make_writer_for(&'a self, meta: &tracing::Metadata<'_>) -> Self::Writer {
        EscapingWriter(self.0.make_writer_for(meta))
    }
}
