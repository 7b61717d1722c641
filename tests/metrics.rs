//! Metrics in node_exporter's textfile format: every line parses as Prometheus text
//! exposition, the values are the manifest's and the drill's, a failed backup shows as a
//! failed run, and every metric the shipped alert rules use is one lifeboat writes.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use crate::common::{files_job, lifeboat, local_repository, tree, write_config};

/// Parses a metrics file, insisting that every sample line is understood.
fn parse(path: &Path) -> Vec<prometheus_parse::Sample> {
    let text = std::fs::read_to_string(path).unwrap();
    let lines = text.lines().map(|l| Ok(l.to_string()));
    let scrape = prometheus_parse::Scrape::parse(lines).unwrap();
    let sample_lines = text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .count();
    assert_eq!(
        scrape.samples.len(),
        sample_lines,
        "every line of {} parses:\n{text}",
        path.display()
    );
    for family in text.lines().filter_map(|l| l.strip_prefix("# TYPE ")) {
        assert!(family.ends_with(" gauge"), "{family}");
    }
    scrape.samples
}

fn value(samples: &[prometheus_parse::Sample], name: &str, labels: &[(&str, &str)]) -> f64 {
    let sample = samples
        .iter()
        .find(|s| s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .unwrap_or_else(|| panic!("no {name} {labels:?}"));
    match sample.value {
        prometheus_parse::Value::Gauge(v) | prometheus_parse::Value::Untyped(v) => v,
        ref other => panic!("{name} is {other:?}"),
    }
}

#[test]
fn metrics_are_valid_exposition_and_match_the_manifest() {
    let work = tempfile::tempdir().unwrap();
    let tree = work.path().join("etc");
    std::fs::create_dir_all(&tree).unwrap();
    std::fs::write(tree.join("app.conf"), "listen = 8080\n".repeat(100)).unwrap();
    let metrics = work.path().join("metrics");
    let config = write_config(
        work.path(),
        &format!(
            "metrics_dir = \"{}\"\n{}{}{}",
            metrics.display(),
            local_repository("one", &work.path().join("one")),
            local_repository("two", &work.path().join("two")),
            files_job("conf", &[&tree]) + "retention = { keep_daily = 7 }\n"
        ),
    );
    lifeboat(&config, &["backup", "conf"]).assert_code(0);
    let drill = work.path().join("drill.toml");
    std::fs::write(
        &drill,
        format!(
            "name = \"conf-back\"\njob = \"conf\"\n\n[[check]]\nname = \"app.conf\"\npath = \"{}\"\ncontains = \"listen\"\n",
            tree.join("app.conf").display()
        ),
    )
    .unwrap();
    let reports = work.path().join("reports");
    lifeboat(
        &config,
        &[
            "drill",
            "run",
            drill.to_str().unwrap(),
            "--report-dir",
            reports.to_str().unwrap(),
        ],
    )
    .assert_code(0);

    let show = lifeboat(
        &config,
        &["show", "latest", "--job", "conf", "--format", "json"],
    );
    let manifest: serde_json::Value = serde_json::from_str(&show.stdout).unwrap();
    let state = parse(&metrics.join("lifeboat.prom"));
    let job = [("job", "conf")];
    let recovery_point: chrono::DateTime<chrono::Utc> = manifest["recovery_point"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let newest = value(&state, "lifeboat_backup_newest_timestamp_seconds", &job);
    assert!((newest - recovery_point.timestamp_micros() as f64 / 1e6).abs() < 1e-3);
    // Each repository's window is the one backup; retention promises six days back.
    for repository in ["one", "two"] {
        let window = [("job", "conf"), ("repository", repository)];
        assert_eq!(
            value(&state, "lifeboat_window_start_timestamp_seconds", &window),
            newest
        );
        assert_eq!(
            value(&state, "lifeboat_window_end_timestamp_seconds", &window),
            newest
        );
    }
    assert_eq!(
        value(&state, "lifeboat_retention_promise_seconds", &job),
        6.0 * 86400.0
    );
    // What the RPO alert reads, as a moment: its age is computed by Prometheus from time().
    assert_eq!(
        value(&state, "lifeboat_restorable_timestamp_seconds", &job),
        newest
    );
    // The status timer rewrites the state alone, when nothing else runs.
    std::fs::remove_file(metrics.join("lifeboat.prom")).unwrap();
    lifeboat(&config, &["status", "--write-metrics"]).assert_code(0);
    let rewritten = parse(&metrics.join("lifeboat.prom"));
    assert_eq!(
        value(&rewritten, "lifeboat_restorable_timestamp_seconds", &job),
        newest
    );
    let objects = manifest["objects"].as_array().unwrap();
    let sum = |field: &str| {
        objects
            .iter()
            .map(|o| o[field].as_u64().unwrap())
            .sum::<u64>() as f64
    };
    assert_eq!(
        value(&state, "lifeboat_backup_newest_raw_bytes", &job),
        sum("raw_size")
    );
    assert_eq!(
        value(&state, "lifeboat_backup_newest_stored_bytes", &job),
        sum("size")
    );
    for repository in ["one", "two"] {
        assert_eq!(
            value(
                &state,
                "lifeboat_backup_newest_present",
                &[("job", "conf"), ("repository", repository)]
            ),
            1.0
        );
    }
    assert_eq!(
        value(
            &state,
            "lifeboat_drill_last_passed",
            &[("job", "conf"), ("drill", "conf-back")]
        ),
        1.0
    );
    assert_eq!(value(&state, "lifeboat_rpo_target_seconds", &job), 3600.0);
    assert_eq!(value(&state, "lifeboat_status", &job), 0.0);
    let backup_run = parse(&metrics.join("lifeboat-backup-conf.prom"));
    let labels = [("command", "backup"), ("job", "conf")];
    assert_eq!(
        value(&backup_run, "lifeboat_last_run_success", &labels),
        1.0
    );

    // A failed backup: its run says so; the repositories still show the last good one.
    std::fs::remove_dir_all(&tree).unwrap();
    lifeboat(&config, &["backup", "conf"]).assert_code(1);
    let backup_run = parse(&metrics.join("lifeboat-backup-conf.prom"));
    assert_eq!(
        value(&backup_run, "lifeboat_last_run_success", &labels),
        0.0
    );
    let state = parse(&metrics.join("lifeboat.prom"));
    assert_eq!(
        value(&state, "lifeboat_backup_newest_timestamp_seconds", &job),
        newest
    );
    // Only complete files: no temp file left for the collector to trip over.
    let names: BTreeSet<String> = std::fs::read_dir(&metrics)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "lifeboat-backup-conf.prom",
            "lifeboat-drill-conf.prom",
            "lifeboat.prom"
        ]
        .map(String::from)
        .into()
    );

    // The exit code tells a failure from a lock held by another run, which pages nobody.
    assert_eq!(
        value(&backup_run, "lifeboat_last_run_exit_code", &labels),
        1.0
    );
    let locked_config = work.path().join("locked.toml");
    std::fs::write(
        &locked_config,
        std::fs::read_to_string(&config).unwrap().replacen(
            "metrics_dir",
            &format!(
                "lock_dir = \"{}\"\nmetrics_dir",
                work.path().join("locks").display()
            ),
            1,
        ),
    )
    .unwrap();
    let loaded = lifeboat::config::Config::load(&locked_config).unwrap();
    let lock = lifeboat::lock::lock_path(&loaded, "conf");
    std::fs::create_dir_all(lock.parent().unwrap()).unwrap();
    let held = std::fs::File::create(&lock).unwrap();
    held.lock().unwrap();
    lifeboat(&locked_config, &["backup", "conf"]).assert_code(75);
    drop(held);
    let locked_run = parse(&metrics.join("lifeboat-backup-conf.prom"));
    assert_eq!(
        value(&locked_run, "lifeboat_last_run_exit_code", &labels),
        75.0
    );

    let archiving = wal_push_metrics(work.path(), &metrics);

    // Every metric the shipped alert rules use is one of these.
    let written: BTreeSet<String> = state
        .iter()
        .chain(&backup_run)
        .chain(&locked_run)
        .chain(&archiving)
        .map(|s| s.metric.clone())
        .collect();
    let rules_path = Path::new(env!("CARGO_MANIFEST_DIR")).join("runbooks/alerts.yml");
    let rules: serde_norway::Value =
        serde_norway::from_str(&std::fs::read_to_string(&rules_path).unwrap()).unwrap();
    let rules = rules["groups"][0]["rules"].as_sequence().unwrap();
    let alerts_md =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("runbooks/alerts.md"))
            .unwrap();
    let mut alerts = BTreeMap::new();
    for rule in rules {
        let name = rule["alert"].as_str().unwrap();
        let expr = rule["expr"].as_str().unwrap();
        assert!(rule["labels"]["severity"].as_str().is_some(), "{name}");
        assert!(rule["annotations"]["summary"].as_str().is_some(), "{name}");
        // Every alert leads to its section of runbooks/alerts.md.
        let runbook = rule["annotations"]["runbook_url"]
            .as_str()
            .unwrap_or_default();
        let section = format!(
            "runbooks/alerts.md#{}-{}",
            name.to_lowercase(),
            rule["labels"]["severity"].as_str().unwrap()
        );
        assert_eq!(runbook, section, "{name}'s runbook_url");
        assert!(
            alerts_md.lines().any(|l| l
                == format!(
                    "## {name} ({})",
                    rule["labels"]["severity"].as_str().unwrap()
                )),
            "runbooks/alerts.md has no heading for {runbook}"
        );
        for used in expr
            .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .filter(|word| word.starts_with("lifeboat_"))
        {
            assert!(
                written.contains(used),
                "{name} uses {used}, which lifeboat does not write"
            );
        }
        alerts.insert(name.to_string(), expr.to_string());
    }
    for wanted in [
        "LifeboatRPOBreached",
        "LifeboatWALArchivingFailing",
        "LifeboatNeverDrilled",
        "LifeboatBackupFailing",
        "LifeboatRegionMissingBackup",
        "LifeboatNoPassingDrill",
        "LifeboatProjectedRTOOverTarget",
    ] {
        assert!(alerts.contains_key(wanted), "{wanted}");
    }
}

/// `wal-push` keeps `lifeboat-wal-JOB.prom`: when archiving last worked and failed, and how
/// many pushes in a row failed, so a stuck `archive_command` (pg_wal filling) alerts.
fn wal_push_metrics(work: &Path, metrics: &Path) -> Vec<prometheus_parse::Sample> {
    let config = work.join("archive.toml");
    std::fs::write(
        &config,
        format!(
            "metrics_dir = \"{}\"\n{}[[job]]\nname = \"db\"\nkind = \"postgres\"\nmode = \"physical\"\ndsn = \"postgresql://postgres@127.0.0.1:9/postgres\"\n",
            metrics.display(),
            local_repository("wal", &work.join("wal-repo")),
        ),
    )
    .unwrap();
    let pg_wal = work.join("pg_wal");
    std::fs::create_dir_all(&pg_wal).unwrap();
    let push = |name: &str, bytes: &[u8]| {
        let path = pg_wal.join(name);
        std::fs::write(&path, bytes).unwrap();
        lifeboat(
            &config,
            &["wal-push", "--job", "db", path.to_str().unwrap()],
        )
    };
    let file = metrics.join("lifeboat-wal-db.prom");
    let job = [("job", "db")];
    let first = "000000010000000000000005";
    let before = chrono::Utc::now().timestamp() as f64;
    push(first, &tree::wal_segment(first, tree::FAKE_SYSTEM, 5)).assert_code(0);
    let archived = parse(&file);
    let success = value(
        &archived,
        "lifeboat_wal_push_last_success_timestamp_seconds",
        &job,
    );
    assert!(success >= before, "{success} < {before}");
    assert_eq!(
        value(&archived, "lifeboat_wal_push_consecutive_failures", &job),
        0.0
    );

    // PostgreSQL retries the segment it could not archive: three failures in a row.
    let next = "000000010000000000000006";
    for failures in 1..=3 {
        push(next, b"not a WAL segment").assert_code(1);
        let failing = parse(&file);
        assert_eq!(
            value(&failing, "lifeboat_wal_push_consecutive_failures", &job),
            f64::from(failures)
        );
        assert_eq!(
            value(
                &failing,
                "lifeboat_wal_push_last_success_timestamp_seconds",
                &job
            ),
            success,
            "a failure keeps when archiving last worked"
        );
    }
    let failing = parse(&file);
    assert!(
        value(
            &failing,
            "lifeboat_wal_push_last_failure_timestamp_seconds",
            &job
        ) >= success
    );
    // A config that no longer loads fails every push: counted all the same, whether it holds
    // a key this version does not know or is not even TOML (a quote left open in an edit).
    let good_config = std::fs::read_to_string(&config).unwrap();
    for (failures, broken) in [
        (4.0, format!("bogus_key = 1\n{good_config}")),
        (5.0, format!("{good_config}\n[targets]\nrpo = \"1h\n")),
    ] {
        std::fs::write(&config, broken).unwrap();
        push(next, &tree::wal_segment(next, tree::FAKE_SYSTEM, 6)).assert_code(2);
        let counted = parse(&file);
        assert_eq!(
            value(&counted, "lifeboat_wal_push_consecutive_failures", &job),
            failures
        );
    }
    std::fs::write(&config, good_config).unwrap();
    push(next, &tree::wal_segment(next, tree::FAKE_SYSTEM, 6)).assert_code(0);
    let recovered = parse(&file);
    assert_eq!(
        value(&recovered, "lifeboat_wal_push_consecutive_failures", &job),
        0.0
    );
    // Each repository's window, before any base backup: its archive never verified.
    lifeboat(&config, &["status", "--write-metrics"]);
    let state = parse(&metrics.join("lifeboat.prom"));
    let repository = [("job", "db"), ("repository", "wal")];
    assert_eq!(
        value(
            &state,
            "lifeboat_archive_verified_timestamp_seconds",
            &repository
        ),
        0.0
    );
    assert_eq!(value(&state, "lifeboat_window_gaps", &repository), 0.0);
    failing.into_iter().chain(recovered).chain(state).collect()
}

/// The promtool that `.ci/setup` extracts from Debian's prometheus package (the server is
/// not installed), else one on PATH.
fn promtool() -> std::path::PathBuf {
    let bundled = Path::new(env!("CARGO_MANIFEST_DIR")).join(".tools/prometheus/bin/promtool");
    if bundled.exists() {
        return bundled;
    }
    let found = std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|dir| dir.join("promtool"))
            .find(|p| p.exists())
    });
    found.expect(
        "promtool is needed to test the alert rules; run `bash .ci/setup` (it extracts it into .tools/prometheus)",
    )
}

/// The rules, evaluated by Prometheus' own engine against the disasters they exist for
/// (`tests/alerts/alerts.test.yml`): the timers stop and the files freeze, wal-push fails
/// three times, a job is never drilled, a backup finds its lock held.
#[test]
fn alert_rules_fire_on_the_disasters_they_exist_for() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let rules = root.join("runbooks/alerts.yml");
    for (args, dir) in [
        (
            vec!["check", "rules", rules.to_str().unwrap()],
            root.to_path_buf(),
        ),
        (
            vec!["test", "rules", "alerts.test.yml"],
            root.join("tests/alerts"),
        ),
    ] {
        let run = crate::common::run_command(
            std::process::Command::new(promtool())
                .args(&args)
                .current_dir(dir),
        );
        assert_eq!(
            run.code, 0,
            "promtool {args:?}: {}{}",
            run.stdout, run.stderr
        );
    }
}
