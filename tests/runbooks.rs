//! Runbooks that cannot rot: every fenced block tagged `sh runbook` in `runbooks/*.md` is run,
//! in order, against scratch servers and repositories, with the placeholders a runbook
//! names (`$RESTORE_DIR`, `$LIVE_DIR`, …) set by the harness. A command that fails — a flag
//! that no longer exists, a step that no longer works — fails the test with the runbook's
//! file and line. Drills and runbooks that name each other must both exist.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::common::postgres::Postgres;
use crate::common::{
    Scenario, SeaweedFs, files_job, lifeboat, postgres_job, seaweedfs, tree, write_config,
};

const RUNBOOKS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/runbooks");
const DRILLS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/drills");

/// One `sh runbook` block: where it starts (the line after the fence) and its text.
struct Block {
    line: usize,
    code: String,
}

fn blocks(path: &Path) -> Vec<Block> {
    let text = std::fs::read_to_string(path).unwrap();
    let mut found = Vec::new();
    let mut current: Option<Block> = None;
    for (index, line) in text.lines().enumerate() {
        match &mut current {
            None if line.trim_end() == "```sh runbook" => {
                current = Some(Block {
                    line: index + 2,
                    code: String::new(),
                })
            }
            Some(_) if line.trim_end() == "```" => found.extend(current.take()),
            Some(block) => {
                block.code.push_str(line);
                block.code.push('\n');
            }
            None => {}
        }
    }
    assert!(
        current.is_none(),
        "{}: an unterminated block",
        path.display()
    );
    found
}

/// Runs every `sh runbook` block of `path` in order in one bash (so a variable set in one
/// step is there in the next), with `env` and the lifeboat binary first on PATH. On failure:
/// the runbook's file and line, the command, and what it printed.
fn run_runbook(path: &Path, env: &[(&str, String)], cwd: &Path) -> Result<String, String> {
    let blocks = blocks(path);
    if blocks.is_empty() {
        return Err(format!("{}: no `sh runbook` block", path.display()));
    }
    // Script line → runbook line, to name where a failure is.
    let mut script =
        String::from("set -euo pipefail\ntrap 'echo \"@@failed-at $LINENO\" >&2' ERR\n");
    let mut origin: Vec<usize> = vec![0, 0];
    for block in &blocks {
        for (offset, line) in block.code.lines().enumerate() {
            script.push_str(line);
            script.push('\n');
            origin.push(block.line + offset);
        }
    }
    let binary_dir = Path::new(env!("CARGO_BIN_EXE_lifeboat")).parent().unwrap();
    let path_var = format!(
        "{}:{}:{}",
        binary_dir.display(),
        crate::common::postgres::bin_dir().display(),
        std::env::var("PATH").unwrap_or_default()
    );
    // Files, not pipes: a daemon a runbook starts keeps its inherited descriptors open, and
    // a pipe would then never reach its end.
    let logs = tempfile::tempdir().unwrap();
    let (stdout_path, stderr_path) = (logs.path().join("stdout"), logs.path().join("stderr"));
    let status = Command::new("bash")
        .arg("-c")
        .arg(&script)
        .current_dir(cwd)
        .stdin(std::process::Stdio::null())
        .stdout(std::fs::File::create(&stdout_path).unwrap())
        .stderr(std::fs::File::create(&stderr_path).unwrap())
        .env("PATH", path_var)
        .env_remove("LIFEBOAT_IDENTITY_FILE")
        .env("AWS_ACCESS_KEY_ID", seaweedfs::ACCESS_KEY)
        .env("AWS_SECRET_ACCESS_KEY", seaweedfs::SECRET_KEY)
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .status()
        .unwrap();
    let stdout = String::from_utf8_lossy(&std::fs::read(&stdout_path).unwrap()).into_owned();
    let stderr = String::from_utf8_lossy(&std::fs::read(&stderr_path).unwrap()).into_owned();
    if status.success() {
        return Ok(stdout);
    }
    let failed_line = stderr
        .lines()
        .rev()
        .filter_map(|l| l.strip_prefix("@@failed-at "))
        .find_map(|n| n.trim().parse::<usize>().ok());
    // $LINENO counts from 1; `origin` from 0.
    let (place, command) =
        match failed_line.and_then(|n| origin.get(n.checked_sub(1)?).map(|line| (n, *line))) {
            Some((script_line, runbook_line)) if runbook_line > 0 => (
                format!("{}:{runbook_line}", path.display()),
                script
                    .lines()
                    .nth(script_line - 1)
                    .unwrap_or_default()
                    .to_string(),
            ),
            _ => (path.display().to_string(), String::new()),
        };
    Err(format!(
        "{place}: `{}` failed ({})\n--- stdout\n{stdout}\n--- stderr\n{stderr}",
        command.trim(),
        status
    ))
}

#[test]
fn a_failing_step_names_the_runbook_file_and_line() {
    let work = tempfile::tempdir().unwrap();
    let runbook = work.path().join("broken.md");
    std::fs::write(
        &runbook,
        "# Broken\n\n```sh runbook\ntrue\n```\n\nText.\n\n```sh runbook\necho step two\nlifeboat restore config --into-the-past /x\necho never\n```\n",
    )
    .unwrap();
    let config = write_config(
        work.path(),
        &crate::common::local_repository("local", &work.path().join("repo")),
    );
    let err = run_runbook(
        &runbook,
        &[("LIFEBOAT_CONFIG", config.display().to_string())],
        work.path(),
    )
    .unwrap_err();
    assert!(
        err.starts_with(&format!(
            "{}:11: `lifeboat restore config --into-the-past /x` failed",
            runbook.display()
        )),
        "{err}"
    );
    assert!(
        err.contains("unexpected argument '--into-the-past'"),
        "{err}"
    );
}

/// Where each runbook shows its last drill: between a `<!-- last drill: REPORT -->` line and
/// this one, the RTO/RPO and timeline tables of the drill report `runbooks/REPORT`, kept from
/// a real run (`LIFEBOAT_RECORD_DRILLS=1`, below).
const LAST_DRILL_START: &str = "<!-- last drill: ";
const LAST_DRILL_END: &str = "<!-- /last drill -->";

/// Runs `drill` with `config` and returns its Markdown report; it must pass.
fn run_drill(config: &Path, drill: &Path) -> String {
    let reports = tempfile::tempdir().unwrap();
    let run = lifeboat(
        config,
        &[
            "drill",
            "run",
            drill.to_str().unwrap(),
            "--report-dir",
            reports.path().to_str().unwrap(),
        ],
    );
    run.assert_code(0);
    let report = files_in(reports.path().to_str().unwrap(), "md")
        .pop()
        .expect("the drill wrote a Markdown report");
    let report = std::fs::read_to_string(report).unwrap();
    keep_if_recording(&report);
    report
}

/// With `LIFEBOAT_RECORD_DRILLS` set: keeps the Markdown `report` of a drill that passed as
/// `runbooks/last-drills/NAME.md` and gives every runbook that shows it its tables.
fn keep_if_recording(report: &str) {
    if std::env::var_os("LIFEBOAT_RECORD_DRILLS").is_some() {
        let name = drill_name(report);
        let kept = Path::new(RUNBOOKS).join(format!("last-drills/{name}.md"));
        std::fs::create_dir_all(kept.parent().unwrap()).unwrap();
        std::fs::write(&kept, report).unwrap();
        for runbook in files_in(RUNBOOKS, "md") {
            let text = std::fs::read_to_string(&runbook).unwrap();
            if let Some((block, reference)) = last_drill_block(&text)
                && reference == format!("last-drills/{name}.md")
            {
                let rendered = render_last_drill(&reference, report);
                std::fs::write(&runbook, text.replacen(block, &rendered, 1)).unwrap();
            }
        }
    }
}

/// `# Drill NAME: PASS` → NAME.
fn drill_name(report: &str) -> &str {
    let heading = report.lines().next().unwrap_or_default();
    heading
        .strip_prefix("# Drill ")
        .and_then(|rest| rest.rsplit_once(": "))
        .map(|(name, _)| name)
        .unwrap_or_else(|| panic!("not a drill report: {heading}"))
}

/// The runbook's last-drill block (markers included) and the report it names.
fn last_drill_block(runbook: &str) -> Option<(&str, String)> {
    let start = runbook.find(LAST_DRILL_START)?;
    let end = start + runbook[start..].find(LAST_DRILL_END)? + LAST_DRILL_END.len();
    let block = &runbook[start..end];
    let reference = block[LAST_DRILL_START.len()..]
        .split_once(" -->")?
        .0
        .to_string();
    Some((block, reference))
}

/// The block a runbook shows for `report` (kept as `runbooks/REFERENCE`): which drill, when,
/// the verdict, and the report's own RTO/RPO and timeline tables, verbatim.
fn render_last_drill(reference: &str, report: &str) -> String {
    let name = drill_name(report);
    let verdict = report.lines().next().unwrap().rsplit_once(": ").unwrap().1;
    let declared = report
        .lines()
        .find_map(|l| l.strip_prefix("Declared at "))
        .and_then(|l| l.split_once(" (t0)"))
        .map(|(at, _)| at)
        .expect("the report says when the drill was declared");
    let table = |header: &str| -> String {
        report
            .lines()
            .skip_while(|l| *l != header)
            .take_while(|l| l.starts_with('|'))
            .map(|l| format!("{l}\n"))
            .collect()
    };
    let restored = report
        .lines()
        .find_map(|l| l.strip_prefix("- restored "))
        .expect("the report says how much was restored");
    let targets = table("| | target | measured | met |");
    let timeline = table("| phase | from t0 | took |");
    assert!(
        !targets.is_empty() && !timeline.is_empty(),
        "{reference}: no RTO/RPO or timeline table"
    );
    // 2026-11-26T20:49:13.029206634+00:00 → 2026-11-26 20:49:13 UTC
    let declared = format!(
        "{} UTC",
        declared.get(..19).unwrap_or(declared).replace('T', " ")
    );
    format!(
        "{LAST_DRILL_START}{reference} -->\n[`drills/{name}.toml`](../drills/{name}.toml), run {declared}: **{verdict}**, restored {restored} ([the report]({reference})).\n\n{targets}\n{timeline}{LAST_DRILL_END}"
    )
}

#[test]
fn every_runbook_shows_its_last_drill_from_a_kept_report() {
    if std::env::var_os("LIFEBOAT_RECORD_DRILLS").is_some() {
        // The other tests are rewriting the blocks; run again without it to check them.
        return;
    }
    for runbook in EXECUTED {
        let path = Path::new(RUNBOOKS).join(runbook);
        let text = std::fs::read_to_string(&path).unwrap();
        let (block, reference) = last_drill_block(&text)
            .unwrap_or_else(|| panic!("{runbook} has no `{LAST_DRILL_START}…` block"));
        let report = std::fs::read_to_string(Path::new(RUNBOOKS).join(&reference))
            .unwrap_or_else(|e| panic!("{runbook} shows {reference}: {e}"));
        assert_eq!(
            block,
            render_last_drill(&reference, &report),
            "{runbook}: its last-drill block is not {reference}'s tables; LIFEBOAT_RECORD_DRILLS=1 \
             cargo test --release --test integration runbooks records them again"
        );
        assert!(report.starts_with(&format!("# Drill {}: PASS", drill_name(&report))));
        let drill = Path::new(DRILLS).join(format!("{}.toml", drill_name(&report)));
        assert!(
            drill.exists(),
            "{reference} is a drill that {} no longer is",
            drill.display()
        );
    }
}

/// GitHub's anchor of a Markdown heading: lower case, punctuation dropped, spaces to '-'.
fn anchor(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter(|c| c.is_alphanumeric() || *c == ' ' || *c == '-' || *c == '_')
        .map(|c| if c == ' ' { '-' } else { c })
        .collect()
}

fn anchors(runbook: &Path) -> Vec<String> {
    std::fs::read_to_string(runbook)
        .unwrap()
        .lines()
        .filter_map(|l| {
            l.strip_prefix('#')
                .map(|h| anchor(h.trim_start_matches('#')))
        })
        .collect()
}

fn files_in(dir: &str, extension: &str) -> Vec<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == extension))
        .collect();
    found.sort();
    found
}

/// Every runbook, and the test that runs it.
const EXECUTED: [&str; 13] = [
    "alerts.md",
    "archive-gap.md",
    "bad-change.md",
    "compromised-bucket.md",
    "config-restore.md",
    "lost-backup-host.md",
    "postgres-point-in-time.md",
    "postgres-restore-latest.md",
    "quarterly-drill.md",
    "redis-restore.md",
    "region-outage.md",
    "service-failover.md",
    "without-lifeboat.md",
];

#[test]
fn every_runbook_has_steps_the_tests_run() {
    // README.md is the index: what you see, and which runbook it leads to.
    let present: Vec<String> = files_in(RUNBOOKS, "md")
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .filter(|name| name != "README.md")
        .collect();
    assert_eq!(
        present, EXECUTED,
        "a runbook without a test that runs it, or the reverse"
    );
    let tests =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/runbooks.rs"))
            .unwrap();
    for runbook in EXECUTED {
        assert!(
            !blocks(&Path::new(RUNBOOKS).join(runbook)).is_empty(),
            "{runbook} has no `sh runbook` block"
        );
        // Named once in EXECUTED, and again by the test that runs it.
        assert!(
            tests.matches(&format!("\"{runbook}\"")).count() >= 2,
            "no test runs {runbook}"
        );
    }
    // The index at the top of runbooks/README.md leads to every runbook, and to nothing else.
    let index = std::fs::read_to_string(Path::new(RUNBOOKS).join("README.md")).unwrap();
    let linked = regex::Regex::new(r"\]\(([a-z-]+\.md)\)").unwrap();
    let mut led_to: Vec<String> = linked
        .captures_iter(&index)
        .map(|c| c[1].to_string())
        .collect();
    led_to.sort();
    led_to.dedup();
    assert_eq!(led_to, EXECUTED, "runbooks/README.md's table");
}

#[test]
fn drills_and_runbooks_that_name_each_other_exist() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    for drill in files_in(DRILLS, "toml") {
        let text = std::fs::read_to_string(&drill).unwrap();
        let table: toml::Table = text.parse().unwrap();
        let Some(reference) = table.get("runbook").and_then(|r| r.as_str()) else {
            continue;
        };
        let (file, section) = reference.split_once('#').unwrap_or((reference, ""));
        let runbook = root.join(file);
        assert!(
            runbook.exists(),
            "{} names {file}, which does not exist",
            drill.display()
        );
        if !section.is_empty() {
            assert!(
                anchors(&runbook).iter().any(|a| a == section),
                "{} names section #{section} of {file}, which has no such heading: {:?}",
                drill.display(),
                anchors(&runbook)
            );
        }
    }
    // Every alert a runbook names is one the rules define, and alerts.md explains each.
    let rules: serde_norway::Value =
        serde_norway::from_str(&std::fs::read_to_string(root.join("runbooks/alerts.yml")).unwrap())
            .unwrap();
    let alerts: Vec<String> = rules["groups"][0]["rules"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|rule| rule["alert"].as_str().unwrap().to_string())
        .collect();
    let explained = anchors(&root.join("runbooks/alerts.md"));
    for alert in &alerts {
        assert!(
            explained
                .iter()
                .any(|a| a.starts_with(&alert.to_lowercase())),
            "runbooks/alerts.md has no section for {alert}"
        );
    }
    let named = regex::Regex::new(r"\bLifeboat[A-Z][A-Za-z]+").unwrap();
    for runbook in files_in(RUNBOOKS, "md") {
        let text = std::fs::read_to_string(&runbook).unwrap();
        for name in named.find_iter(&text) {
            assert!(
                alerts.iter().any(|a| a == name.as_str()),
                "{} names the alert {}, which runbooks/alerts.yml does not define",
                runbook.display(),
                name.as_str()
            );
        }
        for (index, _) in text.match_indices("drills/") {
            let name: String = text[index..]
                .chars()
                .take_while(|c| c.is_alphanumeric() || matches!(c, '/' | '-' | '_' | '.'))
                .collect();
            let name = name.trim_end_matches('.');
            if name.ends_with(".toml") {
                assert!(
                    root.join(name).exists(),
                    "{} names {name}, which does not exist",
                    runbook.display()
                );
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_restore_runbook_puts_the_backed_up_files_back() {
    let s3 = SeaweedFs::start().await;
    for bucket in ["backups-primary", "backups-dr"] {
        s3.create_bucket(bucket).await;
    }
    let work = tempfile::tempdir().unwrap();
    let live = work.path().join("live/etc/nginx");
    tree::build(&live, 40, 1);
    std::fs::write(
        live.join("nginx.conf"),
        "http {\n    server {\n        listen 8080;\n    }\n}\n",
    )
    .unwrap();
    let original = work.path().join("original");
    copy_tree(&live, &original);
    let config = Scenario::new(work.path())
        .raw(&s3.repository("primary", "backups-primary", "lifeboat"))
        .raw(&s3.repository("dr", "backups-dr", "lifeboat"))
        .files_job("config", &[&live])
        .write();
    lifeboat(&config, &["backup", "config"]).assert_code(0);
    // The damage: a file overwritten, one removed.
    let mut files: Vec<PathBuf> = walk(&live);
    files.sort();
    std::fs::write(&files[0], b"garbage").unwrap();
    std::fs::remove_file(&files[1]).unwrap();
    let damaged = work.path().join("damaged");
    copy_tree(&live, &damaged);

    let restore_dir = work.path().join("restore-config");
    run_runbook(
        &Path::new(RUNBOOKS).join("config-restore.md"),
        &[
            ("LIFEBOAT_CONFIG", config.display().to_string()),
            ("RESTORE_DIR", restore_dir.display().to_string()),
            ("LIVE_DIR", live.display().to_string()),
        ],
        work.path(),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    tree::assert_same(&original, &live);
    // What was live before the restore went over it is kept, exactly.
    let kept: Vec<PathBuf> = std::fs::read_dir(work.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("restore-config.live-before-")
        })
        .collect();
    assert_eq!(kept.len(), 1, "{kept:?}");
    tree::assert_same(&damaged, &kept[0].join(live.strip_prefix("/").unwrap()));

    // The drill the runbook links, its /etc/nginx being the scratch tree here.
    let drill = work.path().join("config-files.toml");
    std::fs::write(
        &drill,
        std::fs::read_to_string(Path::new(DRILLS).join("config-files.toml"))
            .unwrap()
            .replace("\"/etc/nginx/", &format!("\"{}/", live.display())),
    )
    .unwrap();
    let report = run_drill(&config, &drill);
    assert!(report.contains("| nginx main config is back |"), "{report}");
}

/// `cp -a FROM TO`: a tree kept as it was, owners, modes and times included.
fn copy_tree(from: &Path, to: &Path) {
    let copied = Command::new("cp")
        .arg("-a")
        .arg(from)
        .arg(to)
        .status()
        .unwrap();
    assert!(
        copied.success(),
        "cp -a {} {}",
        from.display(),
        to.display()
    );
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            found.extend(walk(&path));
        } else if path.is_file() {
            found.push(path);
        }
    }
    found
}

/// The deployment the PostgreSQL runbooks are written for: a `maindb` job (logical, with a
/// heartbeat) backed up into a `primary` and a `dr` repository, and a new empty server to
/// restore into.
struct PostgresDeployment {
    s3: SeaweedFs,
    source: Postgres,
    target: Postgres,
    work: tempfile::TempDir,
    config: PathBuf,
}

impl PostgresDeployment {
    async fn start() -> PostgresDeployment {
        PostgresDeployment::start_with("").await
    }

    /// `extra`: top-level config text (an `[encryption]` table).
    async fn start_with(extra: &str) -> PostgresDeployment {
        let s3 = SeaweedFs::start().await;
        for bucket in ["backups-primary", "backups-dr"] {
            s3.create_bucket(bucket).await;
        }
        let source = Postgres::start();
        source.create_app_database(50_000);
        let work = tempfile::tempdir().unwrap();
        let password_file = source.password_file(work.path(), &source.password);
        let config = write_config(
            work.path(),
            &format!(
                "{extra}{}{}{}",
                s3.repository("primary", "backups-primary", "lifeboat"),
                s3.repository("dr", "backups-dr", "lifeboat"),
                postgres_job(
                    "maindb",
                    &source.dsn("postgres"),
                    &password_file,
                    "heartbeat = true"
                )
            ),
        );
        lifeboat(&config, &["backup", "maindb"]).assert_code(0);
        PostgresDeployment {
            s3,
            source,
            target: Postgres::start(),
            work,
            config,
        }
    }

    fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("LIFEBOAT_CONFIG", self.config.display().to_string()),
            ("TARGET_DSN", self.target.dsn("postgres")),
            ("APP_DSN", self.target.dsn("app")),
            ("PGPASSWORD", self.target.password.clone()),
        ]
    }

    fn run(&self, runbook: &str) -> String {
        run_runbook(
            &Path::new(RUNBOOKS).join(runbook),
            &self.env(),
            self.work.path(),
        )
        .unwrap_or_else(|e| panic!("{e}"))
    }

    fn assert_restored(&self) {
        assert_eq!(
            self.target.data_fingerprint("app"),
            self.source.data_fingerprint("app")
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_restore_latest_runbook_restores_every_row() {
    let deployment = PostgresDeployment::start().await;
    let printed = deployment.run("postgres-restore-latest.md");
    deployment.assert_restored();
    // Step 4 shows the heartbeat the backup wrote.
    assert!(printed.contains("maindb|"), "{printed}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn region_outage_runbook_restores_from_dr_and_reseeds_the_primary() {
    let deployment = PostgresDeployment::start().await;
    // The primary region's bucket is gone, and comes back empty.
    deployment
        .s3
        .delete_bucket_entirely("backups-primary")
        .await;
    deployment.s3.create_bucket("backups-primary").await;
    deployment.run("region-outage.md");
    deployment.assert_restored();
    let reseeded = deployment
        .s3
        .keys("backups-primary", "lifeboat/jobs/maindb/backups/")
        .await;
    let in_dr = deployment
        .s3
        .keys("backups-dr", "lifeboat/jobs/maindb/backups/")
        .await;
    assert_eq!(reseeded, in_dr);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_lifeboat_runbook_restores_with_standard_tools_alone() {
    let keys = tempfile::tempdir().unwrap();
    let identity = keys.path().join("escrow.key");
    let keygen = lifeboat(
        &keys.path().join("none.toml"),
        &["keygen", "--output", identity.to_str().unwrap()],
    );
    keygen.assert_code(0);
    let signing_key = keys.path().join("signing.key");
    let signer = lifeboat(
        &keys.path().join("none.toml"),
        &[
            "keygen",
            "--signing",
            "--output",
            signing_key.to_str().unwrap(),
        ],
    );
    signer.assert_code(0);
    let signer = signer.stdout.trim().to_string();
    let deployment = PostgresDeployment::start_with(&format!(
        "[encryption]\nrecipients = [\"{}\"]\n\n[signing]\nkey_file = \"{}\"\ntrusted_signers = [\"{signer}\"]\n\n",
        keygen.stdout.trim(),
        signing_key.display()
    ))
    .await;
    let target = &deployment.target;
    let steps = run_runbook(
        &Path::new(RUNBOOKS).join("without-lifeboat.md"),
        &[
            ("REPOSITORY", "s3://backups-dr/lifeboat".to_string()),
            ("S3_ENDPOINT", deployment.s3.endpoint.clone()),
            ("IDENTITY", identity.display().to_string()),
            ("DATABASE", "app".to_string()),
            ("SIGNER", signer.clone()),
            ("PGHOST", "127.0.0.1".to_string()),
            ("PGPORT", target.port.to_string()),
            ("PGUSER", "postgres".to_string()),
            ("PGPASSWORD", target.password.clone()),
        ],
        deployment.work.path(),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    // The objects were the encrypted ones, and each checked out against the manifest.
    assert!(steps.contains("app.dump.zst.age: OK"), "{steps}");
    // The manifest was checked against the signing key with minisign itself.
    assert!(
        steps.contains("Signature and comment signature verified"),
        "{steps}"
    );
    deployment.assert_restored();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn point_in_time_runbook_brings_back_a_dropped_table() {
    use crate::postgres_physical::{BUCKET, JOB, Restored, archiving_cluster, shared_work_dir};
    let s3 = SeaweedFs::start().await;
    s3.create_bucket(BUCKET).await;
    let work = shared_work_dir();
    let (source, config) = archiving_cluster(work.path(), &[&s3], "");
    source.psql("postgres", "create table orders (id int primary key)");
    source.psql(
        "postgres",
        "insert into orders select generate_series(1, 500)",
    );
    lifeboat(&config, &["backup", JOB]).assert_code(0);
    // The heartbeat timer's rows, one before the moment the drill recovers to (3 s after
    // the backup), one after it, which the drill must not bring back.
    let recovery_point: chrono::DateTime<chrono::Utc> = serde_json::from_str::<serde_json::Value>(
        &lifeboat(
            &config,
            &["show", "latest", "--job", JOB, "--format", "json"],
        )
        .stdout,
    )
    .unwrap()["recovery_point"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    lifeboat(&config, &["heartbeat", JOB]).assert_code(0);
    let after_target = recovery_point + chrono::Duration::seconds(4);
    if let Ok(wait) = (after_target - chrono::Utc::now()).to_std() {
        std::thread::sleep(wait);
    }
    lifeboat(&config, &["heartbeat", JOB]).assert_code(0);
    source.psql(
        "postgres",
        "insert into orders select generate_series(501, 700)",
    );
    std::thread::sleep(std::time::Duration::from_millis(500));
    let before_damage = source.psql(
        "postgres",
        "select to_char(clock_timestamp() at time zone 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')",
    );
    std::thread::sleep(std::time::Duration::from_millis(500));
    source.psql("postgres", "drop table orders");
    source.archive_current_wal();

    let data_dir = work.path().join("recovered");
    let _restored = Restored(data_dir.clone());
    let port = crate::common::postgres::free_port();
    let printed = run_runbook(
        &Path::new(RUNBOOKS).join("postgres-point-in-time.md"),
        &[
            ("LIFEBOAT_CONFIG", config.display().to_string()),
            ("JOB", JOB.to_string()),
            ("RECOVERY_TIME", before_damage.clone()),
            ("DATA_DIR", data_dir.display().to_string()),
            ("PORT", port.to_string()),
            ("DATABASE", "postgres".to_string()),
            ("PGPASSWORD", source.password.clone()),
        ],
        work.path(),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    assert!(printed.contains("orders"), "{printed}");
    assert_eq!(
        Postgres::attach(port, &source.password)
            .psql("postgres", "select count(*), max(id) from orders"),
        "700|700",
        "every row committed before {before_damage}"
    );
    // The shipped drill, recovering to 3 s after the backup instead of 2 minutes.
    let drill = work.path().join("point-in-time.toml");
    std::fs::write(
        &drill,
        std::fs::read_to_string(Path::new(DRILLS).join("point-in-time.toml"))
            .unwrap()
            .replace(
                "to_time = \"2min after the backup\"",
                "to_time = \"3s after the backup\"",
            ),
    )
    .unwrap();
    // It passes (every check, the heartbeat written after the moment absent), and says
    // where it recovered to.
    let report = run_drill(&config, &drill);
    let target = (recovery_point + chrono::Duration::seconds(3)).format("%Y-%m-%d %H:%M:%S");
    assert!(
        report.contains(&format!("recovered to {target}")),
        "{report}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn archive_gap_runbook_repairs_a_region_and_proves_it_whole() {
    use crate::postgres_physical::{BUCKET, JOB, PREFIX, archiving_cluster, shared_work_dir};
    let main = SeaweedFs::start().await;
    let dr = SeaweedFs::start().await;
    main.create_bucket(BUCKET).await;
    dr.create_bucket(BUCKET).await;
    let work = shared_work_dir();
    let (source, config) = archiving_cluster(work.path(), &[&main, &dr], "");
    source.psql("postgres", "create table orders (id int primary key)");
    lifeboat(&config, &["backup", JOB]).assert_code(0);
    let mut segments = Vec::new();
    for batch in 0..3 {
        source.psql("postgres", &format!("insert into orders values ({batch})"));
        segments.push(source.archive_current_wal());
    }
    lifeboat(&config, &["verify", "--archive", JOB]).assert_code(0);
    // The dr region loses the middle segment.
    dr.client()
        .delete_object()
        .bucket(BUCKET)
        .key(format!(
            "{PREFIX}/jobs/{JOB}/wal/00000001/{}.zst",
            segments[1]
        ))
        .send()
        .await
        .unwrap();
    let printed = run_runbook(
        &Path::new(RUNBOOKS).join("archive-gap.md"),
        &[
            ("LIFEBOAT_CONFIG", config.display().to_string()),
            ("JOB", JOB.to_string()),
        ],
        work.path(),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    assert!(
        printed.contains(&format!("GAP      WAL segment {} is missing", segments[1]))
            && printed.contains("is impossible in repository 'region2'"),
        "{printed}"
    );
    // Step 3 proved it whole without a new backup: one file read, in dr.
    assert!(
        printed.contains("0 gap(s), 0 damaged file(s), 1 file(s) read"),
        "{printed}"
    );
    lifeboat(&config, &["verify", "--archive", JOB]).assert_code(0);
}

#[test]
fn alerts_runbook_checks_run() {
    let work = tempfile::tempdir().unwrap();
    let source = work.path().join("etc/app");
    tree::build(&source, 10, 0);
    let metrics = work.path().join("metrics");
    std::fs::create_dir(&metrics).unwrap();
    let config = write_config(
        work.path(),
        &format!(
            "metrics_dir = \"{}\"\n\n{}{}",
            metrics.display(),
            crate::common::local_repository("local", &work.path().join("repo")),
            files_job("config", &[&source])
        ),
    );
    lifeboat(&config, &["backup", "config"]).assert_code(0);
    let printed = run_runbook(
        &Path::new(RUNBOOKS).join("alerts.md"),
        &[
            ("LIFEBOAT_CONFIG", config.display().to_string()),
            ("JOB", "config".to_string()),
            ("METRICS_DIR", metrics.display().to_string()),
        ],
        work.path(),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    assert!(printed.contains("lifeboat-backup-config.prom"), "{printed}");
}

#[test]
fn redis_restore_runbook_brings_the_sessions_back_into_the_live_server() {
    use crate::common::redis::{PASSWORD, Redis, snapshot};
    let live = Redis::start(&[]);
    let mut connection = live.connection().unwrap();
    let mut pipe = redis::pipe();
    for index in 0..3_000 {
        pipe.cmd("SET")
            .arg(format!("session:{index}"))
            .arg(format!("user-{index}"))
            .arg("EX")
            .arg(86_400)
            .ignore();
    }
    pipe.cmd("HSET")
        .arg("config:site")
        .arg("currency")
        .arg("EUR")
        .ignore();
    let () = pipe.query(&mut connection).unwrap();
    let work = tempfile::tempdir().unwrap();
    let password_file = work.path().join("redis.pass");
    crate::common::write_secret(&password_file, PASSWORD, 0o600);
    let config = write_config(
        work.path(),
        &format!(
            "{}{}[[job]]\nname = \"sessions\"\nkind = \"redis\"\nurl = \"{}\"\npassword_file = \"{}\"\nheartbeat = true\n",
            crate::common::local_repository("primary", &work.path().join("primary")),
            crate::common::local_repository("dr", &work.path().join("dr")),
            live.url(),
            password_file.display()
        ),
    );
    lifeboat(&config, &["backup", "sessions"]).assert_code(0);
    let expected = snapshot(&mut connection);
    // The damage: every key gone.
    let () = redis::cmd("FLUSHALL").query(&mut connection).unwrap();

    // After the runbook stops the live server, it starts one like it on the same port and
    // data directory: what `systemctl start` does on a real host.
    let pidfile = live.dir.path().join("restarted.pid");
    let redis_conf = work.path().join("redis.conf");
    std::fs::write(
        &redis_conf,
        format!(
            "port {}\nbind 127.0.0.1\ndir \"{}\"\nsave \"\"\nappendonly no\nrequirepass \"{}\"\ndaemonize yes\npidfile \"{}\"\nlogfile \"{}\"\n",
            live.port,
            live.dir.path().display(),
            PASSWORD.replace('\\', "\\\\"),
            pidfile.display(),
            live.dir.path().join("restarted.log").display()
        ),
    )
    .unwrap();
    let start = format!("redis-server {}", redis_conf.display());
    let _restarted = StopByPidfile(pidfile.clone());
    let outcome = run_runbook(
        &Path::new(RUNBOOKS).join("redis-restore.md"),
        &[
            ("LIFEBOAT_CONFIG", config.display().to_string()),
            ("REDISCLI_AUTH", PASSWORD.to_string()),
            ("REDIS_PORT", live.port.to_string()),
            ("REDIS_START", start),
            ("REDIS_STOP", format!("redis-cli -p {} shutdown", live.port)),
        ],
        work.path(),
    );
    outcome.unwrap_or_else(|e| panic!("{e}"));
    let restored = snapshot(&mut live.connection().unwrap());
    assert_eq!(restored.len(), expected.len());
    assert_eq!(restored, expected);
    run_drill(&config, &Path::new(DRILLS).join("sessions.toml"));
}

/// Stops, when dropped, the daemon whose pid is in the file (if it was started).
struct StopByPidfile(PathBuf);

impl Drop for StopByPidfile {
    fn drop(&mut self) {
        if let Some(pid) = std::fs::read_to_string(&self.0)
            .ok()
            .and_then(|p| p.trim().parse::<i32>().ok())
        {
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
    }
}

/// The drill the quarterly runbook runs is the one the PostgreSQL runbooks show as their last.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quarterly_drill_runbook_runs_reads_and_files_a_drill() {
    let deployment = PostgresDeployment::start().await;
    let work = &deployment.work;
    let evidence = work.path().join("evidence");
    let mut env = deployment.env();
    env.push((
        "DRILL",
        Path::new(DRILLS)
            .join("region-loss.toml")
            .display()
            .to_string(),
    ));
    env.push(("EVIDENCE_DIR", evidence.display().to_string()));
    let printed = run_runbook(
        &Path::new(RUNBOOKS).join("quarterly-drill.md"),
        &env,
        work.path(),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    assert!(printed.contains("drill region-loss: PASS"), "{printed}");
    let sums = std::fs::read_to_string(evidence.join("SHA256SUMS")).unwrap();
    assert_eq!(sums.lines().count(), 3, "{sums}");
    let check = Command::new("sha256sum")
        .args(["--check", "--quiet", "SHA256SUMS"])
        .current_dir(&evidence)
        .status()
        .unwrap();
    assert!(check.success());
    let report = files_in(evidence.to_str().unwrap(), "md").pop().unwrap();
    keep_if_recording(&std::fs::read_to_string(report).unwrap());
}

/// Rows of the tables a bad change hits, as a checksum: what must come back.
fn orders_fingerprint(cluster: &Postgres) -> String {
    ["shop.orders", "shop.order_lines", "shop.events"]
        .iter()
        .map(|table| {
            cluster.psql(
                "app",
                &format!("select count(*) || ' ' || md5(string_agg(t::text, ',' order by t::text)) from {table} t"),
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// A "migration" deletes every new order (and, cascading, their lines) on the live server;
/// orders keep coming in after it. The runbook backs up the damage, finds the backup from
/// before, restores it beside the live database and copies the lost rows back: the live
/// database then holds every row it had before the change and every one written since.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_change_runbook_brings_back_what_a_migration_deleted_and_keeps_what_came_since() {
    let deployment = PostgresDeployment::start().await;
    let source = &deployment.source;
    // Columns a plain copy trips over: one generated, one an identity always generated.
    source.psql(
        "app",
        "alter table shop.orders add column total_x2 numeric generated always as (total * 2) stored; \
         create table shop.events (id int generated always as identity primary key, note text); \
         insert into shop.events (note) select 'event ' || i from generate_series(1, 100) i",
    );
    lifeboat(&deployment.config, &["backup", "maindb"]).assert_code(0);
    let before = orders_fingerprint(source);
    std::thread::sleep(std::time::Duration::from_millis(1100));
    let change_time = source.psql(
        "postgres",
        "select to_char(clock_timestamp() at time zone 'UTC', 'YYYY-MM-DD HH24:MI:SS')",
    );
    std::thread::sleep(std::time::Duration::from_millis(1100));
    source.psql("app", "delete from shop.orders where status = 'new'");
    source.psql("app", "delete from shop.events where id % 2 = 0");
    source.psql(
        "app",
        "insert into shop.orders (customer_id, created_at, total, status) values (1, now(), 9.99, 'paid')",
    );
    let newest = source.psql("app", "select max(id) from shop.orders");
    assert_ne!(orders_fingerprint(source), before);

    let printed = run_runbook(
        &Path::new(RUNBOOKS).join("bad-change.md"),
        &[
            ("LIFEBOAT_CONFIG", deployment.config.display().to_string()),
            ("CHANGE_TIME", change_time),
            ("TARGET_DSN", source.dsn("postgres")),
            ("APP_DSN", source.dsn("app")),
            ("SIDE_DSN", source.dsn("app_before_change")),
            (
                "TABLES",
                "shop.orders=id shop.order_lines=order_id,line shop.events=id".to_string(),
            ),
            ("PGPASSWORD", source.password.clone()),
        ],
        deployment.work.path(),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    // The damaged state was backed up first, and was not the one restored.
    let ids: Vec<&str> = printed
        .lines()
        .filter_map(|l| l.strip_prefix("last backup before the change: "))
        .collect();
    assert_eq!(ids.len(), 1, "{printed}");
    // Every row from before the change, and the order written after it.
    source.psql(
        "app",
        &format!("delete from shop.orders where id = {newest}"),
    );
    assert_eq!(orders_fingerprint(source), before);
    assert_eq!(
        source.psql(
            "postgres",
            "select count(*) from pg_database where datname = 'app_before_change'"
        ),
        "0"
    );
}

/// Ransomware in the primary region: every stored backup object there is overwritten. The
/// runbook finds the intact repository, restores from it and repairs the primary.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compromised_bucket_runbook_restores_from_the_intact_region_and_repairs_the_other() {
    let deployment = PostgresDeployment::start().await;
    let s3 = &deployment.s3;
    let objects: Vec<String> = s3
        .keys("backups-primary", "lifeboat/jobs/maindb/backups/")
        .await
        .into_iter()
        .filter(|k| k.ends_with(".zst"))
        .collect();
    assert!(!objects.is_empty());
    for key in &objects {
        s3.client()
            .put_object()
            .bucket("backups-primary")
            .key(key)
            .body(b"your files are encrypted; pay".to_vec().into())
            .send()
            .await
            .unwrap();
    }
    // The key was stolen after the backup: nothing was written since.
    std::thread::sleep(std::time::Duration::from_millis(1100));
    let since = chrono::Utc::now().format("%Y-%m-%dT%H:%M:%S").to_string();
    let mut env = deployment.env();
    env.extend([
        ("COMPROMISED_SINCE", since),
        ("S3_ENDPOINT", s3.endpoint.clone()),
        ("PRIMARY", "s3://backups-primary/lifeboat".to_string()),
        ("DR", "s3://backups-dr/lifeboat".to_string()),
        ("INTACT", "dr".to_string()),
        ("INTACT_URL", "s3://backups-dr/lifeboat".to_string()),
    ]);
    let printed = run_runbook(
        &Path::new(RUNBOOKS).join("compromised-bucket.md"),
        &env,
        deployment.work.path(),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let id = lifeboat(&deployment.config, &["list", "maindb"]).stdout;
    assert!(
        printed.contains("newest backup stored before the compromise: 20"),
        "{printed}\n{id}"
    );
    assert!(printed.contains("damaged"), "{printed}");
    deployment.assert_restored();
    for key in &objects {
        assert_eq!(
            s3.object("backups-primary", key).await,
            s3.object("backups-dr", key).await,
            "{key} repaired"
        );
    }
}

/// Break-glass from an empty directory: the config copy and the escrow key (which takes two
/// people to open) from the DR bucket, then a restore of encrypted backups from it alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_backup_host_runbook_restores_from_what_the_dr_region_keeps() {
    let keys = tempfile::tempdir().unwrap();
    let none = keys.path().join("none.toml");
    let keygen = |name: &str| {
        let path = keys.path().join(name);
        let run = lifeboat(&none, &["keygen", "--output", path.to_str().unwrap()]);
        run.assert_code(0);
        (path, run.stdout.trim().to_string())
    };
    let (escrow, escrow_recipient) = keygen("escrow.key");
    let (alice, alice_recipient) = keygen("alice.key");
    let (bob, bob_recipient) = keygen("bob.key");
    let deployment = PostgresDeployment::start_with(&format!(
        "[encryption]\nrecipients = [\"{escrow_recipient}\"]\n\n"
    ))
    .await;
    // What was prepared beforehand: the config and the escrow key, encrypted to Bob, then
    // to Alice.
    let sealed = Command::new("bash")
        .arg("-c")
        .arg(format!(
            "age -r {bob_recipient} '{}' | age -r {alice_recipient}",
            escrow.display()
        ))
        .output()
        .unwrap();
    assert!(sealed.status.success());
    let s3 = &deployment.s3;
    for (key, body) in [
        (
            "break-glass/lifeboat.toml",
            std::fs::read(&deployment.config).unwrap(),
        ),
        ("break-glass/escrow.key.age", sealed.stdout),
    ] {
        s3.client()
            .put_object()
            .bucket("backups-dr")
            .key(key)
            .body(body.into())
            .send()
            .await
            .unwrap();
    }
    // The primary region, and the host with its config, are gone.
    s3.delete_bucket_entirely("backups-primary").await;
    std::fs::remove_file(&deployment.config).unwrap();

    let fresh = tempfile::tempdir().unwrap();
    let printed = run_runbook(
        &Path::new(RUNBOOKS).join("lost-backup-host.md"),
        &[
            ("BREAK_GLASS", "s3://backups-dr/break-glass".to_string()),
            ("S3_ENDPOINT", s3.endpoint.clone()),
            ("ALICE_KEY", alice.display().to_string()),
            ("BOB_KEY", bob.display().to_string()),
            ("TARGET_DSN", deployment.target.dsn("postgres")),
            ("PGPASSWORD", deployment.target.password.clone()),
        ],
        fresh.path(),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    assert!(printed.lines().any(|l| l == "app"), "{printed}");
    deployment.assert_restored();
    // The opened key is not left behind.
    assert!(!fresh.path().join("escrow.key").exists());
    assert!(!fresh.path().join("escrow.key.bob.age").exists());
}

/// The whole service into the DR region: the database, the sessions into a new Redis, the
/// configuration onto a new host, then the job re-pointed at the new primary and backed up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_failover_runbook_brings_every_part_back_and_backs_up_the_new_primary() {
    use crate::common::redis::{PASSWORD, Redis, snapshot};
    let deployment = PostgresDeployment::start().await;
    let work = deployment.work.path();
    let sessions = Redis::start(&[]);
    let mut connection = sessions.connection().unwrap();
    for index in 0..200 {
        let () = redis::cmd("SET")
            .arg(format!("session:{index}"))
            .arg(format!("user-{index}"))
            .query(&mut connection)
            .unwrap();
    }
    let nginx = work.join("old-host/etc/nginx");
    tree::build(&nginx, 20, 0);
    let redis_password = work.join("redis.pass");
    crate::common::write_secret(&redis_password, PASSWORD, 0o600);
    let old_dsn = deployment.source.dsn("postgres");
    let mut config = std::fs::read_to_string(&deployment.config).unwrap();
    config.push_str(&format!(
        "[[job]]\nname = \"sessions\"\nkind = \"redis\"\nurl = \"{}\"\npassword_file = \"{}\"\n\n{}",
        sessions.url(),
        redis_password.display(),
        files_job("config", &[&nginx])
    ));
    std::fs::write(&deployment.config, config).unwrap();
    for job in ["sessions", "config"] {
        lifeboat(&deployment.config, &["backup", job]).assert_code(0);
    }
    let expected_sessions = snapshot(&mut connection);
    // The old host is gone; the new one has an empty /etc/nginx of its own.
    let original_nginx = work.join("original-nginx");
    copy_tree(&nginx, &original_nginx);
    std::fs::remove_dir_all(&nginx).unwrap();
    // The new primary was provisioned with the backup role's credentials, as the old one.
    let password_file = deployment.config.parent().unwrap().join("pgpass-new");
    crate::common::write_secret(&password_file, &deployment.target.password, 0o600);
    let text = std::fs::read_to_string(&deployment.config).unwrap();
    let old_password_file = text
        .lines()
        .find_map(|l| l.strip_prefix("password_file = \""))
        .map(|rest| rest.trim_end_matches('"').to_string())
        .unwrap();
    std::fs::copy(&password_file, &old_password_file).unwrap();

    // The new Redis in the DR region: stopped until the RDB is in its directory.
    let new_redis_dir = tempfile::tempdir().unwrap();
    let redis_port = crate::common::postgres::free_port();
    let pidfile = new_redis_dir.path().join("redis.pid");
    let redis_conf = new_redis_dir.path().join("redis.conf");
    std::fs::write(
        &redis_conf,
        format!(
            "port {redis_port}\nbind 127.0.0.1\ndir \"{}\"\nsave \"\"\nappendonly no\nrequirepass \"{}\"\ndaemonize yes\npidfile \"{}\"\nlogfile \"{}\"\n",
            new_redis_dir.path().display(),
            PASSWORD.replace('\\', "\\\\"),
            pidfile.display(),
            new_redis_dir.path().join("redis.log").display()
        ),
    )
    .unwrap();
    let start = format!("redis-server {}", redis_conf.display());
    let _new_redis = StopByPidfile(pidfile);
    let config_dir = nginx.clone();
    let mut env = deployment.env();
    env.extend([
        ("REDIS_DIR", new_redis_dir.path().display().to_string()),
        ("REDIS_PORT", redis_port.to_string()),
        ("REDIS_START", start),
        ("REDISCLI_AUTH", PASSWORD.to_string()),
        (
            "RESTORE_DIR",
            work.join("restore-config").display().to_string(),
        ),
        ("CONFIG_DIR", config_dir.display().to_string()),
        ("OLD_DSN", old_dsn),
        ("NEW_DSN", deployment.target.dsn("postgres")),
    ]);
    let printed = run_runbook(&Path::new(RUNBOOKS).join("service-failover.md"), &env, work)
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(printed.contains("failover declared"), "{printed}");
    // Every row; the heartbeat row alone moved on, written by the backup of the new primary.
    let without_heartbeat = |fingerprint: String| -> Vec<String> {
        fingerprint
            .lines()
            .filter(|l| !l.starts_with("lifeboat.heartbeat "))
            .map(str::to_string)
            .collect()
    };
    assert_eq!(
        without_heartbeat(deployment.target.data_fingerprint("app")),
        without_heartbeat(deployment.source.data_fingerprint("app"))
    );
    assert_eq!(
        snapshot(&mut crate::common::redis::connect(redis_port)),
        expected_sessions
    );
    tree::assert_same(&original_nginx, &config_dir);
    // The job now backs up the new primary: its newest backup came from the new server.
    let show = lifeboat(
        &deployment.config,
        &["show", "latest", "--job", "maindb", "--format", "json"],
    );
    let manifest: serde_json::Value = serde_json::from_str(&show.stdout).unwrap();
    let new_system = deployment.target.psql(
        "postgres",
        "select system_identifier::text from pg_control_system()",
    );
    assert_eq!(manifest["source"]["system_identifier"], new_system.as_str());
}
