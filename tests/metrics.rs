//! Metrics in node_exporter's textfile format: every line parses as Prometheus text
//! exposition, the values are the manifest's and the drill's, a failed backup shows as a
//! failed run, and every metric the shipped alert rules use is one lifeboat writes.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use crate::common::{files_job, lifeboat, local_repository, write_config};

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
            files_job("conf", &[&tree])
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

    // Every metric the shipped alert rules use is one of these.
    let written: BTreeSet<String> = state
        .iter()
        .chain(&backup_run)
        .map(|s| s.metric.clone())
        .collect();
    let rules_path = Path::new(env!("CARGO_MANIFEST_DIR")).join("runbooks/alerts.yml");
    let rules: serde_norway::Value =
        serde_norway::from_str(&std::fs::read_to_string(&rules_path).unwrap()).unwrap();
    let rules = rules["groups"][0]["rules"].as_sequence().unwrap();
    let mut alerts = BTreeMap::new();
    for rule in rules {
        let name = rule["alert"].as_str().unwrap();
        let expr = rule["expr"].as_str().unwrap();
        assert!(rule["labels"]["severity"].as_str().is_some(), "{name}");
        assert!(rule["annotations"]["summary"].as_str().is_some(), "{name}");
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
        "LifeboatBackupFailing",
        "LifeboatRegionMissingBackup",
        "LifeboatNoPassingDrill",
        "LifeboatProjectedRTOOverTarget",
    ] {
        assert!(alerts.contains_key(wanted), "{wanted}");
    }
}
