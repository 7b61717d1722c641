//! A drill's report: JSON for machines and Markdown for people (verdict first, targets
//! against what was measured, the phase timeline, every check), written side by side.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::file::{Check, CheckKind};
use crate::error::{Error, ErrorKind, Result};
use crate::human::{human_duration, human_size};

#[derive(Debug, Serialize, Deserialize)]
pub struct Phase {
    pub name: String,
    /// Seconds from t0 to the phase's start.
    pub started_after: f64,
    pub seconds: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CheckResult {
    pub name: String,
    pub passed: bool,
    pub expected: String,
    pub returned: String,
}

/// `text` as reports and the terminal may show it: every configured secret in it replaced
/// by `[redacted]`, then every control character written as an escape (`\u{1b}`), so that
/// no value can move the cursor, clear a line or hide the verdict on a terminal.
pub fn kept_text(text: &str, secrets: &[String]) -> String {
    let mut text = text.to_string();
    for secret in secrets.iter().filter(|s| s.len() >= 4) {
        if text.contains(secret.as_str()) {
            text = text.replace(secret.as_str(), "[redacted]");
        }
    }
    if !text.chars().any(char::is_control) {
        return text;
    }
    text.chars()
        .map(|c| match c.is_control() {
            true => format!("\\u{{{:x}}}", c as u32),
            false => c.to_string(),
        })
        .collect()
}

/// The most of a check's returned value a report keeps: a check reads one value, and a
/// report is kept in every repository and mailed around.
pub const MAX_RETURNED: usize = 1024;

impl CheckResult {
    /// The result as a report may keep it: every configured secret in what the check
    /// returned replaced by `[redacted]` (a check may read one out of the restored data or
    /// the server's environment), then cut to `MAX_RETURNED` bytes, saying so.
    pub(super) fn kept(mut self, secrets: &[String]) -> CheckResult {
        self.name = kept_text(&self.name, secrets);
        self.expected = kept_text(&self.expected, secrets);
        self.returned = kept_text(&self.returned, secrets);
        if self.returned.len() > MAX_RETURNED {
            let total = self.returned.len();
            let mut cut = MAX_RETURNED;
            while !self.returned.is_char_boundary(cut) {
                cut -= 1;
            }
            self.returned.truncate(cut);
            self.returned.push_str(&format!(
                "… (cut to the first {} of {})",
                human_size(cut as u64),
                human_size(total as u64)
            ));
        }
        self
    }

    pub(super) fn failed(check: &Check, why: String) -> CheckResult {
        let expected = match &check.kind {
            CheckKind::Sql { expect, .. } | CheckKind::Redis { expect, .. } => expect.to_string(),
            CheckKind::Path { path, expect } => format!("{} {expect}", path.display()),
        };
        CheckResult {
            name: check.name.clone(),
            passed: false,
            expected,
            returned: format!("error: {why}"),
        }
    }
}

/// A target against what was measured, in seconds.
#[derive(Debug, Serialize, Deserialize)]
pub struct Measured {
    pub target_seconds: f64,
    pub measured_seconds: f64,
    pub met: bool,
}

impl Measured {
    pub fn new(target: Duration, measured: Duration) -> Measured {
        Measured {
            target_seconds: target.as_secs_f64(),
            measured_seconds: measured.as_secs_f64(),
            met: measured <= target,
        }
    }
}

/// The restore rate measured, applied to the job's newest backup.
#[derive(Debug, Serialize, Deserialize)]
pub struct Projection {
    pub backup: String,
    pub raw_bytes: u64,
    #[serde(default)]
    pub stored_bytes: u64,
    /// The drill's whole restore rate (restored bytes over restore time).
    pub bytes_per_second: f64,
    /// The RTO a full restore of that backup would take.
    pub rto_seconds: f64,
    pub meets_target: bool,
    /// A files or physical drill's rates, apart from its fixed time: what the projection
    /// scaled (absent from logical drills and reports from before them).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rates: Option<crate::rto_model::RestoreRates>,
}

impl Projection {
    /// What the projection rests on, in words.
    pub fn basis(&self) -> String {
        let Some(rates) = &self.rates else {
            return format!(
                "at the measured {}/s",
                human_size(self.bytes_per_second as u64)
            );
        };
        match rates.stream_bytes_per_second {
            Some(stream) => format!(
                "from {} of fixed time, downloads at {}/s per stream with up to {} in flight{}",
                secs(rates.fixed_seconds),
                human_size(stream as u64),
                rates.streams,
                rates
                    .unpack_bytes_per_second
                    .map(|unpack| format!(" and unpacking at {}/s", human_size(unpack as u64)))
                    .unwrap_or_default()
            ),
            None => "as measured (the drill's backup was too small to measure a download rate)"
                .to_string(),
        }
    }
}

#[derive(Debug, Serialize, Deserialize)]
pub struct DrillReport {
    /// This run's own: its t0 to the second and six hex digits, so that two runs in one
    /// second (on one host or two) keep both reports. Empty in reports from before it.
    #[serde(default)]
    pub run_id: String,
    pub drill: String,
    pub description: Option<String>,
    /// The runbook section the drill proves.
    #[serde(default)]
    pub runbook: Option<String>,
    pub file: String,
    pub job: String,
    pub kind: String,
    pub backup: String,
    /// The repositories the restore read from.
    pub repositories: Vec<String>,
    pub target: String,
    /// t0: the moment the disaster was declared.
    pub declared_at: DateTime<Utc>,
    pub finished_at: DateTime<Utc>,
    pub rto: Measured,
    pub rpo: Measured,
    /// The newest data restored, which RPO is measured to.
    pub rpo_marker: DateTime<Utc>,
    pub rpo_marker_source: String,
    pub phases: Vec<Phase>,
    pub checks: Vec<CheckResult>,
    pub restored_bytes: u64,
    pub stored_bytes: u64,
    /// Seconds the restore took (download, verify, load), for the rate.
    #[serde(default)]
    pub restore_seconds: f64,
    #[serde(default)]
    pub projection: Option<Projection>,
    pub server_version: Option<String>,
    pub lifeboat_version: String,
    pub host: String,
    pub passed: bool,
    /// Set when `--each-repository` ran this drill from this repository alone.
    #[serde(default)]
    pub only_from: Option<String>,
    /// The report files written.
    #[serde(default)]
    pub written: Vec<String>,
    /// The repositories that keep a copy under `drills/DRILL/`.
    #[serde(default)]
    pub stored_in: Vec<String>,
    #[serde(default)]
    pub warnings: Vec<String>,
    /// Why a drill that failed before it had anything to judge failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure: Option<String>,
    /// What a random drill drew, with its seed (`drill run --seed N` draws it again).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub random: Option<super::file::Draw>,
}

fn secs(seconds: f64) -> String {
    human_duration(Duration::from_secs_f64(seconds.max(0.0)))
}

impl DrillReport {
    pub(super) fn judged(mut self, checks_pass: bool) -> DrillReport {
        self.passed = checks_pass && self.rto.met && self.rpo.met;
        self
    }

    /// A new run id for a drill declared at `declared_at` (see `run_id`).
    pub fn new_run_id(declared_at: DateTime<Utc>) -> String {
        use std::hash::{BuildHasher, Hasher};
        let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
        hasher.write_u32(std::process::id());
        hasher.write_i64(declared_at.timestamp_nanos_opt().unwrap_or_default());
        format!(
            "{}-{:06x}",
            crate::layout::backup_id(declared_at),
            hasher.finish() & 0xff_ffff
        )
    }

    /// Its run id, and the repository when it ran from one alone:
    /// `20261126T030000Z-3fa9c1` or `20261126T030000Z-3fa9c1-dr`.
    pub fn report_id(&self) -> String {
        let at = match self.run_id.is_empty() {
            true => crate::layout::backup_id(self.declared_at),
            false => self.run_id.clone(),
        };
        match &self.only_from {
            Some(repository) => format!("{at}-{repository}"),
            None => at,
        }
    }

    pub fn verdict(&self) -> &'static str {
        if self.passed { "PASS" } else { "FAIL" }
    }

    /// Why it failed, one reason per line; empty on PASS.
    pub fn reasons(&self) -> Vec<String> {
        if let Some(failure) = &self.failure {
            return vec![format!(
                "the drill failed before it could be judged: {failure}"
            )];
        }
        let mut reasons: Vec<String> = self
            .checks
            .iter()
            .filter(|c| !c.passed)
            .map(|c| {
                format!(
                    "check '{}' expected {}, got {}",
                    c.name, c.expected, c.returned
                )
            })
            .collect();
        if !self.rto.met {
            reasons.push(format!(
                "RTO {} is over the target {}",
                secs(self.rto.measured_seconds),
                secs(self.rto.target_seconds)
            ));
        }
        if !self.rpo.met {
            reasons.push(format!(
                "RPO {} is over the target {} (newest data restored: {}, from {})",
                secs(self.rpo.measured_seconds),
                secs(self.rpo.target_seconds),
                self.rpo_marker.to_rfc3339(),
                self.rpo_marker_source
            ));
        }
        reasons
    }

    /// Ok on PASS; the error that makes the exit code 1 on FAIL.
    pub fn outcome(&self) -> Result<()> {
        if self.passed {
            return Ok(());
        }
        let mut error = Error::new(
            ErrorKind::Verification,
            format!("drill '{}' failed", self.drill),
        );
        for reason in self.reasons() {
            error = error.with_hint(reason);
        }
        Err(error)
    }

    /// The report in Markdown. Everything that comes from the drill file, the backup or the
    /// restored data is escaped (`md`): a check's result cannot add a row, a link or HTML.
    pub fn markdown(&self) -> String {
        let mut out = String::new();
        let tick = |ok: bool| if ok { "yes" } else { "**no**" };
        out.push_str(&format!(
            "# Drill {}: {}\n\n",
            md(&self.drill),
            self.verdict()
        ));
        if let Some(description) = &self.description {
            out.push_str(&format!("{}\n\n", md(description)));
        }
        if let Some(runbook) = &self.runbook {
            out.push_str(&format!("Proves the runbook section {}.\n\n", md(runbook)));
        }
        for reason in self.reasons() {
            out.push_str(&format!("- {}\n", md(&reason)));
        }
        out.push_str(&format!(
            "\nDeclared at {} (t0); finished at {}. Job {} ({}), backup {}, read from {}; restored into {}.\n\n",
            self.declared_at.to_rfc3339(),
            self.finished_at.to_rfc3339(),
            md(&self.job),
            md(&self.kind),
            md(&self.backup),
            md(&self.repositories.join(", ")),
            md(&self.target)
        ));
        out.push_str("| | target | measured | met |\n|---|---|---|---|\n");
        out.push_str(&format!(
            "| RTO | {} | {} | {} |\n",
            secs(self.rto.target_seconds),
            secs(self.rto.measured_seconds),
            tick(self.rto.met)
        ));
        out.push_str(&format!(
            "| RPO | {} | {} | {} |\n\n",
            secs(self.rpo.target_seconds),
            secs(self.rpo.measured_seconds),
            tick(self.rpo.met)
        ));
        out.push_str(&format!(
            "RPO is measured to {} ({}).\n\n## Timeline\n\n| phase | from t0 | took |\n|---|---|---|\n",
            self.rpo_marker.to_rfc3339(),
            md(&self.rpo_marker_source)
        ));
        for phase in &self.phases {
            out.push_str(&format!(
                "| {} | {} | {} |\n",
                md(&phase.name),
                secs(phase.started_after),
                secs(phase.seconds)
            ));
        }
        out.push_str(
            "\n## Checks\n\n| check | expected | returned | passed |\n|---|---|---|---|\n",
        );
        for check in &self.checks {
            out.push_str(&format!(
                "| {} | {} | {} | {} |\n",
                md(&check.name),
                md(&check.expected),
                md(&check.returned),
                tick(check.passed)
            ));
        }
        let throughput = match self.restore_seconds {
            seconds if seconds > 0.0 => format!(
                "{}/s",
                human_size((self.restored_bytes as f64 / seconds) as u64)
            ),
            _ => "n/a".into(),
        };
        if let Some(projection) = &self.projection {
            out.push_str(&format!(
                "\n## Projection\n\n{}, a full restore of the newest backup {} ({}) would make the RTO {} — {} the {} target. (Not part of the verdict.)\n",
                md(&projection.basis()),
                md(&projection.backup),
                human_size(projection.raw_bytes),
                secs(projection.rto_seconds),
                if projection.meets_target { "within" } else { "**over**" },
                secs(self.rto.target_seconds)
            ));
        }
        if !self.warnings.is_empty() {
            out.push_str("\n## Warnings\n\n");
            for warning in &self.warnings {
                out.push_str(&format!("- {}\n", md(warning)));
            }
        }
        out.push_str(&format!(
            "\n## Backup and environment\n\n- restored {} ({} stored), {throughput}\n- server version: {}\n- lifeboat {} on {}\n- drill file: {}\n",
            human_size(self.restored_bytes),
            human_size(self.stored_bytes),
            md(self.server_version.as_deref().unwrap_or("n/a")),
            md(&self.lifeboat_version),
            md(&self.host),
            md(&self.file)
        ));
        out
    }

    /// A self-contained page: the verdict, targets against measured, the phase timeline drawn
    /// as bars (inline SVG), and every check.
    pub fn html(&self) -> String {
        let total = self
            .phases
            .iter()
            .map(|p| p.started_after + p.seconds)
            .fold(self.rto.measured_seconds, f64::max)
            .max(0.001);
        let (width, row, label) = (640.0, 26.0, 210.0);
        let mut bars = String::new();
        for (index, phase) in self.phases.iter().enumerate() {
            let y = index as f64 * row;
            let x = label + phase.started_after / total * (width - label);
            let w = (phase.seconds / total * (width - label)).max(1.0);
            bars.push_str(&format!(
                "<text x=\"0\" y=\"{:.1}\">{}</text><rect x=\"{x:.1}\" y=\"{:.1}\" width=\"{w:.1}\" height=\"16\" fill=\"#3b82f6\"><title>{}: {}</title></rect><text x=\"{:.1}\" y=\"{:.1}\" fill=\"#555\">{}</text>",
                y + 13.0,
                escape(&phase.name),
                y + 2.0,
                escape(&phase.name),
                secs(phase.seconds),
                (x + w + 4.0).min(width - 40.0),
                y + 13.0,
                secs(phase.seconds)
            ));
        }
        let height = self.phases.len() as f64 * row + 4.0;
        let verdict_colour = if self.passed { "#15803d" } else { "#b91c1c" };
        let mut checks = String::new();
        for check in &self.checks {
            checks.push_str(&format!(
                "<tr><td>{}</td><td><code>{}</code></td><td><code>{}</code></td><td>{}</td></tr>",
                escape(&check.name),
                escape(&check.expected),
                escape(&check.returned),
                if check.passed { "yes" } else { "<b>no</b>" }
            ));
        }
        let reasons: String = self
            .reasons()
            .iter()
            .map(|r| format!("<li>{}</li>", escape(r)))
            .collect();
        format!(
            "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>Drill {name}: {verdict}</title>\
<style>body{{font-family:sans-serif;max-width:760px;margin:2em auto;color:#222}}table{{border-collapse:collapse}}\
td,th{{border:1px solid #ccc;padding:4px 8px;text-align:left}}svg text{{font-size:12px}}</style></head><body>\
<h1>Drill {name}: <span style=\"color:{verdict_colour}\">{verdict}</span></h1><p>{description}</p><ul>{reasons}</ul>\
<table><tr><th></th><th>target</th><th>measured</th><th>met</th></tr>\
<tr><td>RTO</td><td>{rto_target}</td><td>{rto}</td><td>{rto_met}</td></tr>\
<tr><td>RPO</td><td>{rpo_target}</td><td>{rpo}</td><td>{rpo_met}</td></tr></table>\
<p>Declared at {declared} (t0). Job <code>{job}</code>, backup <code>{backup}</code> from {repositories}; restored into {target}. RPO measured to {marker} ({marker_source}).</p>\
<h2>Timeline</h2><svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{width}\" height=\"{height}\" role=\"img\" aria-label=\"phase timeline\">{bars}</svg>\
<h2>Checks</h2><table><tr><th>check</th><th>expected</th><th>returned</th><th>passed</th></tr>{checks}</table>\
{warnings}<p>lifeboat {version} on {host}; drill file <code>{file}</code>; proves <code>{runbook}</code>.</p></body></html>\n",
            name = escape(&self.drill),
            warnings = match self.warnings.is_empty() {
                true => String::new(),
                false => format!(
                    "<h2>Warnings</h2><ul>{}</ul>",
                    self.warnings
                        .iter()
                        .map(|w| format!("<li>{}</li>", escape(w)))
                        .collect::<String>()
                ),
            },
            verdict = self.verdict(),
            description = escape(self.description.as_deref().unwrap_or("")),
            rto_target = secs(self.rto.target_seconds),
            rto = secs(self.rto.measured_seconds),
            rto_met = if self.rto.met { "yes" } else { "<b>no</b>" },
            rpo_target = secs(self.rpo.target_seconds),
            rpo = secs(self.rpo.measured_seconds),
            rpo_met = if self.rpo.met { "yes" } else { "<b>no</b>" },
            declared = self.declared_at.to_rfc3339(),
            job = escape(&self.job),
            backup = escape(&self.backup),
            repositories = escape(&self.repositories.join(", ")),
            target = escape(&self.target),
            marker = self.rpo_marker.to_rfc3339(),
            marker_source = escape(&self.rpo_marker_source),
            version = escape(&self.lifeboat_version),
            host = escape(&self.host),
            file = escape(&self.file),
            runbook = escape(self.runbook.as_deref().unwrap_or("no runbook named")),
        )
    }

    /// Writes `NAME-T0.json`, `NAME-T0.md` and `NAME-T0.html` into `dir`.
    pub(super) fn write(&mut self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| write_error(dir, e))?;
        let stem = format!("{}-{}", self.drill, self.report_id());
        let json_path: PathBuf = dir.join(format!("{stem}.json"));
        let md_path: PathBuf = dir.join(format!("{stem}.md"));
        let html_path: PathBuf = dir.join(format!("{stem}.html"));
        self.written = vec![
            json_path.display().to_string(),
            md_path.display().to_string(),
            html_path.display().to_string(),
        ];
        let json = serde_json::to_vec_pretty(&*self).expect("the report serializes");
        std::fs::write(&json_path, json).map_err(|e| write_error(&json_path, e))?;
        std::fs::write(&md_path, self.markdown()).map_err(|e| write_error(&md_path, e))?;
        std::fs::write(&html_path, self.html()).map_err(|e| write_error(&html_path, e))?;
        Ok(())
    }
}

/// Text made safe to put in Markdown, a table cell included: every mark that could start
/// emphasis, code, a link, an image, a heading, HTML or a cell backslash-escaped (CommonMark
/// shows it as itself), line breaks as spaces.
fn md(text: &str) -> String {
    let mut escaped = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '\n' | '\r' | '\u{2028}' | '\u{2029}' => escaped.push(' '),
            // GitHub's Markdown links bare `http://…` and `www.…`: a `/` escaped is no link.
            '/' => escaped.push_str("\\/"),
            '\\' | '`' | '*' | '_' | '[' | ']' | '(' | ')' | '<' | '>' | '&' | '|' | '#' | '~'
            | '!' | '{' | '}' => {
                escaped.push('\\');
                escaped.push(c);
            }
            c => escaped.push(c),
        }
    }
    escaped
}

/// Text made safe to put inside HTML elements and attribute values.
fn escape(text: &str) -> String {
    let mut escaped = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => escaped.push_str("&amp;"),
            '<' => escaped.push_str("&lt;"),
            '>' => escaped.push_str("&gt;"),
            '"' => escaped.push_str("&quot;"),
            '\'' => escaped.push_str("&#39;"),
            c => escaped.push(c),
        }
    }
    escaped
}

fn write_error(path: &Path, e: std::io::Error) -> Error {
    Error::new(
        ErrorKind::Target,
        format!("unable to write the drill report '{}'", path.display()),
    )
    .with_source(e)
}

impl fmt::Display for DrillReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for warning in &self.warnings {
            writeln!(f, "warning: {warning}")?;
        }
        for check in &self.checks {
            let mark = if check.passed { "ok  " } else { "FAIL" };
            writeln!(
                f,
                "{mark} check '{}': expected {}, got {}",
                check.name, check.expected, check.returned
            )?;
        }
        if let Some(draw) = &self.random {
            writeln!(f, "{}", draw.describe())?;
        }
        writeln!(
            f,
            "drill {}: {} — RTO {} (target {}), RPO {} (target {}), backup {} from {}",
            self.drill,
            self.verdict(),
            secs(self.rto.measured_seconds),
            secs(self.rto.target_seconds),
            secs(self.rpo.measured_seconds),
            secs(self.rpo.target_seconds),
            self.backup,
            self.repositories.join(", ")
        )?;
        if let Some(projection) = &self.projection {
            writeln!(
                f,
                "projected RTO for the newest backup {} ({}): {} (target {}; {})",
                projection.backup,
                human_size(projection.raw_bytes),
                secs(projection.rto_seconds),
                secs(self.rto.target_seconds),
                projection.basis()
            )?;
        }
        writeln!(
            f,
            "report: {}; kept in repositories: {}",
            self.written.join(", "),
            self.stored_in.join(", ")
        )
    }
}
