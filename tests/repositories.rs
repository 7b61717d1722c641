//! Several repositories judged each by what it holds: prune plans per repository (a region
//! that missed the newest backups keeps its own newest), records what it removed, and
//! `replicate` never copies back what prune removed.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use crate::common::{SeaweedFs, files_job, lifeboat, local_repository, write_config};

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
        std::thread::sleep(Duration::from_millis(1100));
        std::fs::write(source.join("data"), data).unwrap();
        let run = lifeboat(&config, &["backup", "conf"]);
        run.assert_code(code);
        run.stdout
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
        assert!(
            plan.stdout.contains(&format!(
                "conf/{removed}: not copied into 'a', 'c': prune removed it on "
            )),
            "{}",
            plan.stdout
        );
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
    assert!(again.stdout.contains("nothing to copy"), "{}", again.stdout);
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
    let config = write_config(
        work.path(),
        &format!(
            "{}{}{}",
            local_repository("a", &a),
            region_b.repository("b", "backups", "lifeboat"),
            files_job("conf", &[&source])
        ),
    );
    for data in ["v1", "v2", "v3"] {
        std::thread::sleep(Duration::from_millis(1100));
        std::fs::write(source.join("data"), data).unwrap();
        lifeboat(&config, &["backup", "conf"]).assert_code(0);
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
            .contains("CRITICAL: repository 'b' holds no marker 'lifeboat.json' while others do")
            && status.stdout.contains("it holds 0 of the 3 backup(s)"),
        "{}",
        status.stdout
    );
    // A backup does not quietly mark it again, and neither does replicate unasked.
    std::fs::write(source.join("data"), "v4").unwrap();
    std::thread::sleep(Duration::from_millis(1100));
    let backup = lifeboat(&config, &["backup", "conf"]);
    backup.assert_code(3);
    assert!(
        backup.stderr.contains("holds no marker"),
        "{}",
        backup.stderr
    );
    let replicate = lifeboat(&config, &["replicate"]);
    replicate.assert_code(1);
    assert!(
        replicate.stdout.contains("replicate --reseed"),
        "{}",
        replicate.stdout
    );
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
    let status = lifeboat(&config, &["status"]);
    assert_ne!(status.code, 2, "{}", status.stdout);
    assert!(!status.stdout.contains("marker"), "{}", status.stdout);
    let rows = listed(&config, "conf");
    assert_eq!(rows.len(), 4);
    assert!(rows.values().all(|r| r == "a,b"), "{rows:?}");
    let into = work.path().join("from-b");
    lifeboat(
        &config,
        &[
            "restore",
            "conf",
            "--from",
            "b",
            "--into",
            into.to_str().unwrap(),
        ],
    )
    .assert_code(0);
    assert_eq!(
        std::fs::read_to_string(into.join(source.strip_prefix("/").unwrap()).join("data")).unwrap(),
        "v4"
    );
}
