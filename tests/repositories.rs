//! Several repositories judged each by what it holds: prune plans per repository (a region
//! that missed the newest backups keeps its own newest), records what it removed, and
//! `replicate` never copies back what prune removed.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use crate::common::{Scenario, SeaweedFs, files_job, lifeboat, local_repository, write_config};

/// `lifeboat list JOB` as id → the REPOSITORIES column (`a,c (missing from b)`).
fn listed(config: &Path, job: &str) -> BTreeMap<String, String> {
    let run = lifeboat(config, &["list", job]);
    run.stdout
        .lines()
        .filter(|l| l.starts_with(&format!("{job} ")))
        .map(|l| {
            let fields: Vec<&str> = l.split_whitespace().collect();
            (fields[1].to_string(), fields[6..].join(" "))
        })
        .collect()
}

/// Backup ids whose manifest the local repository at `root` holds.
fn local_ids(root: &Path, job: &str) -> Vec<String> {
    let dir = root.join("jobs").join(job).join("backups");
    let mut ids: Vec<String> = std::fs::read_dir(&dir)
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .filter(|e| e.path().join("manifest.json").exists())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    ids.sort();
    ids
}

/// Writes `data` into the source's one file and backs it up a second after the last
/// backup (ids have one-second resolution): the run, which exits `code`.
fn back_up(config: &Path, source: &Path, data: &str, code: i32) -> crate::common::Run {
    std::thread::sleep(Duration::from_millis(1100));
    std::fs::write(source.join("data"), data).unwrap();
    let run = lifeboat(config, &["backup", "conf"]);
    run.assert_code(code);
    run
}

/// What `restore conf ARGS` brings back of the source's one file.
fn restored(config: &Path, work: &Path, source: &Path, args: &[&str]) -> String {
    let into = work.join(format!("restore-{}", args.join("-")));
    let mut all = vec!["restore", "conf", "--into", into.to_str().unwrap()];
    all.extend_from_slice(args);
    lifeboat(config, &all).assert_code(0);
    std::fs::read_to_string(into.join(source.strip_prefix("/").unwrap()).join("data")).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_region_that_missed_backups_keeps_its_own_newest_and_replicate_respects_prune() {
    let mut region_b = SeaweedFs::start().await;
    region_b.create_bucket("backups").await;
    let work = tempfile::tempdir().unwrap();
    let source = work.path().join("app");
    std::fs::create_dir(&source).unwrap();
    let (a, c) = (work.path().join("a"), work.path().join("c"));
    let config = write_config(
        work.path(),
        &format!(
            "{}{}{}{}retention = {{ keep_last = 2 }}\n",
            local_repository("a", &a),
            region_b.repository("b", "backups", "lifeboat"),
            local_repository("c", &c),
            files_job("conf", &[&source])
        ),
    );
    let backup = |data: &str, code: i32| {
        back_up(&config, &source, data, code)
            .stdout
            .lines()
            .find_map(|l| l.strip_prefix("backup conf/"))
            .unwrap()
            .split(' ')
            .next()
            .unwrap()
            .to_string()
    };
    let mut ids = vec![backup("v1", 0), backup("v2", 0), backup("v3", 0)];
    // Region b is down for the next two.
    region_b.stop();
    ids.push(backup("v4", 3));
    ids.push(backup("v5", 3));
    region_b.restart().await;

    let prune = lifeboat(&config, &["prune"]);
    prune.assert_code(0);
    assert_eq!(local_ids(&a, "conf"), ids[3..5], "{}", prune.stdout);
    assert_eq!(local_ids(&c, "conf"), ids[3..5], "{}", prune.stdout);
    let after = listed(&config, "conf");
    assert_eq!(
        after.keys().cloned().collect::<Vec<_>>(),
        ids[1..5],
        "b keeps its own two newest: {after:?}\n{}",
        prune.stdout
    );
    assert_eq!(after[&ids[2]], "b (missing from a,c)", "{after:?}");
    assert_eq!(
        restored(&config, work.path(), &source, &["--from", "b"]),
        "v3"
    );

    // What replicate would do, and what it leaves alone because prune removed it.
    let plan = lifeboat(&config, &["replicate", "--dry-run"]);
    plan.assert_code(0);
    assert!(
        plan.stdout
            .contains(&format!("would copy conf/{}/files.tar.zst", ids[4]))
            && plan.stdout.contains("into 'b'"),
        "{}",
        plan.stdout
    );
    for removed in &ids[1..3] {
        plan.assert_stdout_has(format!(
            "conf/{removed}: not copied into 'a', 'c': prune removed it on "
        ));
    }
    lifeboat(&config, &["replicate"]).assert_code(0);
    assert_eq!(local_ids(&a, "conf"), ids[3..5]);
    assert_eq!(local_ids(&c, "conf"), ids[3..5]);
    assert_eq!(after.len(), 4);
    let replicated = listed(&config, "conf");
    assert_eq!(replicated[&ids[4]], "a,b,c", "{replicated:?}");

    // Now b holds the two newest too, and its own plan lets the older two go.
    lifeboat(&config, &["prune"]).assert_code(0);
    let settled = listed(&config, "conf");
    assert_eq!(settled.keys().cloned().collect::<Vec<_>>(), ids[3..5]);
    assert!(settled.values().all(|r| r == "a,b,c"), "{settled:?}");
    let again = lifeboat(&config, &["replicate"]);
    again.assert_code(0);
    again.assert_stdout_has("nothing to copy");
    assert_eq!(restored(&config, work.path(), &source, &[]), "v5");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wiped_bucket_fails_verify_check_and_status_until_replicate_reseeds_it() {
    let region_b = SeaweedFs::start().await;
    region_b.create_bucket("backups").await;
    let work = tempfile::tempdir().unwrap();
    let source = work.path().join("app");
    std::fs::create_dir(&source).unwrap();
    let a = work.path().join("a");
    let config = Scenario::new(work.path())
        .local("a", &a)
        .raw(&region_b.repository("b", "backups", "lifeboat"))
        .files_job("conf", &[&source])
        .write();
    for data in ["v1", "v2", "v3"] {
        back_up(&config, &source, data, 0);
    }
    lifeboat(&config, &["verify"]).assert_code(0);

    // The bucket is deleted and made again, empty.
    region_b.delete_bucket_entirely("backups").await;
    region_b.create_bucket("backups").await;

    let verify = lifeboat(&config, &["verify"]);
    verify.assert_code(1);
    assert!(
        verify.stdout.contains("NOT WHOLE repository 'b'")
            && verify.stderr.contains("replicate --reseed"),
        "{}\n{}",
        verify.stdout,
        verify.stderr
    );
    let from_b = lifeboat(&config, &["verify", "--from", "b"]);
    from_b.assert_code(1);
    assert!(
        from_b
            .stdout
            .contains("repository 'b' holds no backup of job 'conf' while 'a' holds 3"),
        "{}",
        from_b.stdout
    );
    let check = lifeboat(&config, &["check"]);
    check.assert_code(1);
    assert!(
        check.stdout.contains("FAILED   repository 'b'")
            && check
                .stdout
                .contains("holds no marker 'lifeboat.json' while 'a' do(es)"),
        "{}",
        check.stdout
    );
    let status = lifeboat(&config, &["status"]);
    status.assert_code(2);
    assert!(
        status
            .stdout
            .contains("CRITICAL: repository 'b' (s3://backups/lifeboat) holds no marker 'lifeboat.json' while 'a' do(es)")
            && status.stdout.contains("it holds 0 of the 3 backup(s)"),
        "{}",
        status.stdout
    );
    // A backup does not quietly mark it again, and neither does replicate unasked.
    let backup = back_up(&config, &source, "v4", 3);
    backup.assert_stderr_has("holds no marker");
    let replicate = lifeboat(&config, &["replicate"]);
    replicate.assert_code(1);
    replicate.assert_stdout_has("replicate --reseed");
    lifeboat(&config, &["verify"]).assert_code(1);

    let reseed = lifeboat(&config, &["replicate", "--reseed"]);
    reseed.assert_code(0);
    assert!(
        reseed
            .stdout
            .contains("reseeded repository 'b': marker written"),
        "{}",
        reseed.stdout
    );
    lifeboat(&config, &["verify"]).assert_code(0);
    lifeboat(&config, &["verify", "--from", "b"]).assert_code(0);
    lifeboat(&config, &["check"]).assert_code(0);
    // With a drill on record, status is all clear again.
    let drill = work.path().join("conf-drill.toml");
    std::fs::write(
        &drill,
        format!(
            "name = \"conf\"\njob = \"conf\"\n\n[[check]]\nname = \"present\"\npath = \"{}\"\ncontains = \"v4\"\n",
            source.join("data").display()
        ),
    )
    .unwrap();
    let drilled = crate::common::run_command(
        crate::common::lifeboat_command(&config)
            .args(["drill", "run"])
            .arg(&drill)
            .arg("--report-dir")
            .arg(work.path().join("reports")),
    );
    drilled.assert_code(0);
    let status = lifeboat(&config, &["status"]);
    status.assert_code(0);
    let rows = listed(&config, "conf");
    assert_eq!(rows.len(), 4);
    assert!(rows.values().all(|r| r == "a,b"), "{rows:?}");
    assert_eq!(
        restored(&config, work.path(), &source, &["--from", "b"]),
        "v4"
    );
}

/// `lifeboat keygen --output DIR/NAME`: the identity's path and its recipient.
fn keygen(dir: &Path, name: &str) -> (std::path::PathBuf, String) {
    let path = dir.join(name);
    let run = lifeboat(
        &dir.join("unused.toml"),
        &["keygen", "--output", path.to_str().unwrap()],
    );
    run.assert_code(0);
    (path, run.stdout.trim().to_string())
}

fn with_identity(config: &Path, identity: &Path, args: &[&str]) -> crate::common::Run {
    let mut command = crate::common::lifeboat_command(config);
    command.env("LIFEBOAT_IDENTITY_FILE", identity).args(args);
    crate::common::run_command(&mut command)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rekey_with_a_region_down_settles_when_it_is_back() {
    let mut region_b = SeaweedFs::start().await;
    region_b.create_bucket("backups").await;
    let work = tempfile::tempdir().unwrap();
    let (old_key, old_recipient) = keygen(work.path(), "old.key");
    let (new_key, new_recipient) = keygen(work.path(), "new.key");
    let source = work.path().join("app");
    std::fs::create_dir(&source).unwrap();
    let config = write_config(
        work.path(),
        &format!(
            "[encryption]\nrecipients = [\"{old_recipient}\"]\n\n{}{}{}",
            local_repository("a", &work.path().join("a")),
            region_b.repository("b", "backups", "lifeboat"),
            files_job("conf", &[&source])
        ),
    );
    for data in ["v1", "v2"] {
        back_up(&config, &source, data, 0);
    }
    let rekey = ["rekey", "--add-recipient", new_recipient.as_str()];

    region_b.stop();
    with_identity(&config, &old_key, &rekey).assert_code(1);
    region_b.restart().await;

    // b holds its own copies, whole by its own manifest: nothing to copy into it.
    let replicate = lifeboat(&config, &["replicate"]);
    replicate.assert_code(0);
    replicate.assert_stdout_has("nothing to copy");
    let rows = listed(&config, "conf");
    assert!(rows.values().all(|r| r == "a,b"), "{rows:?}");

    // One more rekey finishes b; a is already done.
    let finish = with_identity(
        &config,
        &old_key,
        &[&rekey[..], &["--format", "json"]].concat(),
    );
    finish.assert_code(0);
    let report: serde_json::Value = serde_json::from_str(&finish.stdout).unwrap();
    let rekeyed = |report: &serde_json::Value, name: &str| {
        report["repositories"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["repository"] == name)
            .map(|r| r["backups_rekeyed"].as_array().unwrap().len())
            .unwrap()
    };
    assert_eq!(rekeyed(&report, "a"), 0, "{report}");
    assert_eq!(rekeyed(&report, "b"), 2, "{report}");
    let rows = listed(&config, "conf");
    assert!(rows.values().all(|r| r == "a,b"), "{rows:?}");

    // Settled: neither rekey nor replicate changes anything.
    let again = with_identity(
        &config,
        &old_key,
        &[&rekey[..], &["--format", "json"]].concat(),
    );
    again.assert_code(0);
    let report: serde_json::Value = serde_json::from_str(&again.stdout).unwrap();
    for repository in report["repositories"].as_array().unwrap() {
        assert_eq!(
            repository["backups_rekeyed"].as_array().unwrap().len(),
            0,
            "{report}"
        );
        assert_eq!(repository["leftovers_removed"], 0, "{report}");
    }
    let replicate = lifeboat(&config, &["replicate"]);
    replicate.assert_code(0);
    replicate.assert_stdout_has("nothing to copy");
    // Both copies open with the new key.
    for from in ["a", "b"] {
        let into = work.path().join(format!("from-{from}"));
        with_identity(
            &config,
            &new_key,
            &[
                "restore",
                "conf",
                "--from",
                from,
                "--into",
                into.to_str().unwrap(),
            ],
        )
        .assert_code(0);
        assert_eq!(
            std::fs::read_to_string(into.join(source.strip_prefix("/").unwrap()).join("data"))
                .unwrap(),
            "v2"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prune_in_a_versioned_bucket_removes_every_version_of_what_goes() {
    use aws_sdk_s3::types::{BucketVersioningStatus, VersioningConfiguration};
    let server = SeaweedFs::start().await;
    server.create_bucket("backups").await;
    server
        .client()
        .put_bucket_versioning()
        .bucket("backups")
        .versioning_configuration(
            VersioningConfiguration::builder()
                .status(BucketVersioningStatus::Enabled)
                .build(),
        )
        .send()
        .await
        .expect("enable versioning");
    let work = tempfile::tempdir().unwrap();
    let source = work.path().join("app");
    std::fs::create_dir(&source).unwrap();
    let config = write_config(
        work.path(),
        &format!(
            "{}{}retention = {{ keep_last = 1 }}\n",
            server.repository("s3", "backups", "lifeboat"),
            files_job("conf", &[&source])
        ),
    );
    let mut ids = Vec::new();
    for data in ["v1", "v2", "v3"] {
        back_up(&config, &source, data, 0);
        ids.extend(listed(&config, "conf").into_keys().max());
    }
    let check = lifeboat(&config, &["check"]);
    check.assert_code(0);
    assert!(
        check.stdout.contains("versioning: Enabled")
            && check
                .stdout
                .contains("lifecycle: NO rule expires noncurrent versions"),
        "{}",
        check.stdout
    );

    let prune = lifeboat(&config, &["prune"]);
    prune.assert_code(0);
    prune.assert_stdout_has("stored version(s) of what went");
    // No version and no delete marker of a removed backup's keys is left.
    let mut left = Vec::new();
    let client = server.client();
    let mut key_marker: Option<String> = None;
    let mut version_marker: Option<String> = None;
    loop {
        let page = client
            .list_object_versions()
            .bucket("backups")
            .prefix("lifeboat/jobs/conf/backups/")
            .set_key_marker(key_marker.clone())
            .set_version_id_marker(version_marker.clone())
            .send()
            .await
            .unwrap();
        left.extend(
            page.versions()
                .iter()
                .filter_map(|v| v.key().map(String::from)),
        );
        left.extend(
            page.delete_markers()
                .iter()
                .filter_map(|m| m.key().map(String::from)),
        );
        if page.is_truncated() != Some(true) {
            break;
        }
        key_marker = page.next_key_marker().map(String::from);
        version_marker = page.next_version_id_marker().map(String::from);
    }
    for removed in &ids[..2] {
        let stale: Vec<&String> = left
            .iter()
            .filter(|k| k.contains(removed.as_str()))
            .collect();
        assert!(stale.is_empty(), "versions of removed {removed}: {stale:?}");
    }
    assert!(
        left.iter().any(|k| k.contains(ids[2].as_str())),
        "the kept backup is there: {left:?}"
    );
    assert_eq!(restored(&config, work.path(), &source, &[]), "v3");
}

/// Makes the local repository at `path` unreachable (a link to nowhere where its directory
/// was, as a mount whose volume is gone) and returns a guard that puts it back.
struct Unreachable(std::path::PathBuf, std::path::PathBuf);

impl Unreachable {
    fn make(path: &Path) -> Unreachable {
        let aside = path.with_extension("aside");
        std::fs::rename(path, &aside).unwrap();
        std::os::unix::fs::symlink("/nonexistent/lifeboat-volume", path).unwrap();
        Unreachable(path.to_path_buf(), aside)
    }
}

impl Drop for Unreachable {
    fn drop(&mut self) {
        std::fs::remove_file(&self.0).unwrap();
        std::fs::rename(&self.1, &self.0).unwrap();
    }
}

#[test]
fn planted_removal_records_and_a_removed_marker_do_not_stop_replication_or_get_marked_over() {
    let work = tempfile::tempdir().unwrap();
    let source = work.path().join("app");
    std::fs::create_dir(&source).unwrap();
    let (a, b) = (work.path().join("a"), work.path().join("b"));
    let config = Scenario::new(work.path())
        .local("a", &a)
        .local("b", &b)
        .files_job("conf", &[&source])
        .write();
    back_up(&config, &source, "v1", 0);
    let (v2, v3) = {
        let _down = Unreachable::make(&b);
        back_up(&config, &source, "v2", 3);
        back_up(&config, &source, "v3", 3);
        let mut ids: Vec<String> = local_ids(&a, "conf");
        let v3 = ids.pop().unwrap();
        (ids.pop().unwrap(), v3)
    };
    // Someone with write access plants records: garbage for v2, and one for the newest.
    let removed = a.join("jobs/conf/removed");
    std::fs::create_dir_all(&removed).unwrap();
    std::fs::write(removed.join(format!("{v2}.json")), b"{garbage").unwrap();
    std::fs::write(
        removed.join(format!("{v3}.json")),
        format!(
            "{{\"id\":\"{v3}\",\"removed_at\":\"2026-01-01T00:00:00Z\",\"host\":\"x\",\"removed_from\":[\"a\"]}}"
        ),
    )
    .unwrap();
    let replicate = lifeboat(&config, &["replicate"]);
    replicate.assert_code(0);
    assert!(
        replicate
            .stdout
            .contains("names the newest backup of job 'conf'")
            && replicate
                .stdout
                .contains("is no removal record lifeboat wrote"),
        "{}",
        replicate.stdout
    );
    eprintln!(
        "REPLICATE OUT:\n{}\nERR:\n{}",
        replicate.stdout, replicate.stderr
    );
    assert_eq!(local_ids(&b, "conf"), local_ids(&a, "conf"));
    assert!(local_ids(&b, "conf").contains(&v2) && local_ids(&b, "conf").contains(&v3));

    // b's marker removed while a is out of reach: the next backup does not mark b again.
    std::fs::remove_file(b.join("lifeboat.json")).unwrap();
    {
        let _down = Unreachable::make(&a);
        let refused = back_up(&config, &source, "v4", 1);
        assert!(
            refused
                .stderr
                .contains("holds data under 'jobs/' but no marker 'lifeboat.json'"),
            "{}",
            refused.stderr
        );
    }
    assert!(!b.join("lifeboat.json").exists());
    let check = lifeboat(&config, &["check"]);
    check.assert_code(1);
    lifeboat(&config, &["verify"]).assert_code(1);
    lifeboat(&config, &["replicate", "--reseed"]).assert_code(0);
    assert!(b.join("lifeboat.json").exists());
    lifeboat(&config, &["verify"]).assert_code(0);

    // A marker overwritten with something that is not lifeboat's: named everywhere too.
    let marker = std::fs::read(b.join("lifeboat.json")).unwrap();
    std::fs::write(b.join("lifeboat.json"), b"{garbage").unwrap();
    lifeboat(&config, &["verify"]).assert_code(1);
    let status = lifeboat(&config, &["status"]);
    status.assert_code(2);
    assert!(
        status
            .stdout
            .contains("unable to read marker 'lifeboat.json' in repository 'b'"),
        "{}",
        status.stdout
    );
    let backup = back_up(&config, &source, "v5", 3);
    backup.assert_stderr_has("repository 'b'");
    std::fs::write(b.join("lifeboat.json"), marker).unwrap();
    lifeboat(&config, &["replicate"]).assert_code(0);
    lifeboat(&config, &["verify"]).assert_code(0);
}
