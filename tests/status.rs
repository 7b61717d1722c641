//! `lifeboat status` against real repositories and drills: OK with a fresh backup and a
//! passing drill, WARNING past 80% of the RPO, CRITICAL past it and after a failed drill —
//! with the Nagios exit codes monitoring reads.

use std::path::Path;
use std::time::Duration;

use chrono::{DateTime, Utc};

use crate::common::{Run, files_job, lifeboat, local_repository, write_config};

const RPO_SECONDS: i64 = 20;

fn drill_file(dir: &Path, name: &str, file: &Path, expect: &str) -> std::path::PathBuf {
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(
        &path,
        format!(
            "name = \"{name}\"\njob = \"conf\"\nbackup = \"latest\"\nrto = \"1h\"\nrpo = \"{RPO_SECONDS}s\"\n\n\
             [[check]]\nname = \"the app config is back\"\npath = \"{}\"\ncontains = \"{expect}\"\n",
            file.display()
        ),
    )
    .unwrap();
    path
}

fn status(config: &Path) -> (Run, serde_json::Value) {
    let text = lifeboat(config, &["status"]);
    let json = lifeboat(config, &["status", "--format", "json"]);
    assert_eq!(text.code, json.code, "{}\n{}", text.stdout, json.stdout);
    (text, serde_json::from_str(&json.stdout).unwrap())
}

/// Sleeps until `seconds` after `since`.
fn sleep_until(since: DateTime<Utc>, seconds: i64) {
    let wake = since + chrono::Duration::seconds(seconds);
    if let Ok(wait) = (wake - Utc::now()).to_std() {
        std::thread::sleep(wait);
    }
}

#[test]
fn status_follows_the_rpo_and_the_last_drill_with_nagios_codes() {
    let work = tempfile::tempdir().unwrap();
    let tree = work.path().join("etc");
    std::fs::create_dir_all(&tree).unwrap();
    let app_conf = tree.join("app.conf");
    std::fs::write(&app_conf, "listen = 8080\n").unwrap();
    let config = write_config(
        work.path(),
        &format!(
            "[targets]\nrto = \"1h\"\nrpo = \"{RPO_SECONDS}s\"\n\n{}{}",
            local_repository("local", &work.path().join("repo")),
            files_job("conf", &[&tree])
        ),
    );
    let reports = work.path().join("reports");
    let passing = drill_file(work.path(), "restore-conf", &app_conf, "listen = 8080");

    lifeboat(&config, &["backup", "conf"]).assert_code(0);
    lifeboat(
        &config,
        &[
            "drill",
            "run",
            passing.to_str().unwrap(),
            "--report-dir",
            reports.to_str().unwrap(),
        ],
    )
    .assert_code(0);
    let (run, json) = status(&config);
    run.assert_code(0);
    assert!(run.stdout.starts_with("OK       conf"), "{}", run.stdout);
    let show = lifeboat(
        &config,
        &["show", "latest", "--job", "conf", "--format", "json"],
    );
    let manifest: serde_json::Value = serde_json::from_str(&show.stdout).unwrap();
    let job = &json["jobs"][0];
    assert_eq!(job["newest_backup"], manifest["id"]);
    assert_eq!(job["recovery_point"], manifest["recovery_point"]);
    assert_eq!(job["present_in"], serde_json::json!(["local"]));
    assert_eq!(job["last_drill"]["passed"], true);
    assert!(job["projected_rto_seconds"].as_f64().unwrap() < 3600.0);
    let recovery_point: DateTime<Utc> = manifest["recovery_point"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();

    // 85% of the RPO gone: WARNING.
    sleep_until(recovery_point, RPO_SECONDS * 85 / 100);
    let (run, json) = status(&config);
    run.assert_code(1);
    assert_eq!(json["state"], "WARNING");
    run.assert_stdout_has("WARNING: newest restorable point is");

    // Past the RPO: CRITICAL.
    sleep_until(recovery_point, RPO_SECONDS + 1);
    let (run, json) = status(&config);
    run.assert_code(2);
    assert_eq!(json["state"], "CRITICAL");
    run.assert_stdout_has("CRITICAL: RPO breached");

    // A fresh backup, but the last drill failed: CRITICAL all the same.
    std::fs::write(&app_conf, "listen = 9090\n").unwrap();
    std::thread::sleep(Duration::from_millis(1100));
    lifeboat(&config, &["backup", "conf"]).assert_code(0);
    let failing = drill_file(work.path(), "restore-conf-old", &app_conf, "listen = 8080");
    lifeboat(
        &config,
        &[
            "drill",
            "run",
            failing.to_str().unwrap(),
            "--report-dir",
            reports.to_str().unwrap(),
        ],
    )
    .assert_code(1);
    let (run, json) = status(&config);
    run.assert_code(2);
    assert_eq!(json["jobs"][0]["last_drill"]["passed"], false);
    assert!(
        run.stdout
            .contains("CRITICAL: last drill 'restore-conf-old' FAILED"),
        "{}",
        run.stdout
    );
    assert!(!run.stdout.contains("RPO breached"), "{}", run.stdout);
}

#[test]
fn status_of_an_unreadable_config_is_unknown() {
    let work = tempfile::tempdir().unwrap();
    let missing = work.path().join("missing.toml");
    lifeboat(&missing, &["status"]).assert_code(3);
}

/// `list` and `status` judge a backup by its objects: with one repository and the newest
/// backup's object moved away (or cut short), `list` shows it incomplete and `status` measures
/// the RPO from the backup before it, CRITICAL, until the object is back.
#[test]
fn a_backup_whose_object_is_gone_is_not_counted_by_list_or_status() {
    let work = tempfile::tempdir().unwrap();
    let tree = work.path().join("etc");
    std::fs::create_dir_all(&tree).unwrap();
    std::fs::write(tree.join("app.conf"), "listen = 8080\n").unwrap();
    let repo = work.path().join("repo");
    let config = write_config(
        work.path(),
        &format!(
            "[targets]\nrto = \"1h\"\nrpo = \"1h\"\n\n{}{}",
            local_repository("local", &repo),
            files_job("conf", &[&tree])
        ),
    );
    let backup = || crate::common::back_up(&config, "conf");
    let older = backup();
    std::thread::sleep(Duration::from_millis(1100));
    let newest = backup();
    let (run, json) = status(&config);
    run.assert_code(1); // no drill yet: WARNING, with the newest counted
    assert_eq!(json["jobs"][0]["newest_backup"], newest.as_str(), "{json}");

    let object = repo.join(format!("jobs/conf/backups/{newest}/files.tar.zst"));
    let aside = work.path().join("aside");
    std::fs::rename(&object, &aside).unwrap();
    let list = lifeboat(&config, &["list", "conf"]);
    list.assert_code(0);
    let row = |id: &str| {
        list.stdout
            .lines()
            .find(|l| l.contains(id))
            .unwrap_or_else(|| panic!("{id} not listed: {}", list.stdout))
            .to_string()
    };
    assert!(
        row(&newest).contains("(incomplete in local)"),
        "{}",
        list.stdout
    );
    assert!(row(&older).ends_with(" local"), "{}", list.stdout);
    let (run, json) = status(&config);
    run.assert_code(2);
    run.assert_stdout_has(format!(
            "backup(s) {newest} complete in no repository (an object missing or at the wrong size): they restore nowhere; RPO is measured from {older}"
        ));
    assert_eq!(json["jobs"][0]["newest_backup"], older.as_str(), "{json}");

    // Back, but cut short: still not counted.
    let bytes = std::fs::read(&aside).unwrap();
    std::fs::write(&object, &bytes[..bytes.len() - 1]).unwrap();
    let (run, json) = status(&config);
    run.assert_code(2);
    assert_eq!(json["jobs"][0]["newest_backup"], older.as_str(), "{json}");
    std::fs::write(&object, &bytes).unwrap();
    let (run, json) = status(&config);
    run.assert_code(1);
    assert_eq!(json["jobs"][0]["newest_backup"], newest.as_str(), "{json}");

    // The older backup copied whole under a newer id (a replay, or a slip of `cp -r`): its
    // manifest names another backup, so nothing counts it.
    let replay = repo.join("jobs/conf/backups/20991231T235959Z");
    std::fs::create_dir_all(&replay).unwrap();
    for entry in std::fs::read_dir(repo.join(format!("jobs/conf/backups/{older}"))).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), replay.join(entry.file_name())).unwrap();
    }
    let (run, json) = status(&config);
    run.assert_code(2);
    assert_eq!(json["jobs"][0]["newest_backup"], newest.as_str(), "{json}");
    crate::common::assert_listed_damaged(&config, "conf", "20991231T235959Z", "a replay");
}
