//! Two S3 regions and a local directory: every backup lands in all three from one pass over
//! the source; a region that goes away mid-backup is named, the others commit, and
//! `replicate` completes it once the region is back; a restore reads on from the next region
//! when a copy is damaged or a bucket is gone.

use std::path::Path;
use std::process::Stdio;

use aws_sdk_s3::primitives::ByteStream;
use sha2::{Digest, Sha256};

use crate::common::postgres::Postgres;
use crate::common::{
    Scenario, SeaweedFs, files_job, lifeboat, lifeboat_command, local_repository, procs, tree,
    write_config,
};

const BUCKET: &str = "backups";
const PREFIX: &str = "lifeboat";

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// Every key of the `maindb` job in the local repository, with the sha256 of its bytes.
fn local_objects(repo: &Path) -> Vec<(String, String)> {
    let mut objects: Vec<(String, String)> = walkdir::WalkDir::new(repo.join("jobs"))
        .into_iter()
        .filter_map(Result::ok)
        .filter(|e| e.file_type().is_file())
        .map(|e| {
            let key = e
                .path()
                .strip_prefix(repo)
                .unwrap()
                .to_string_lossy()
                .into_owned();
            (key, sha256_hex(&std::fs::read(e.path()).unwrap()))
        })
        .collect();
    objects.sort();
    objects
}

/// The backups and WAL a region holds: key and sha256. Claims on backup ids are left out: a
/// region lost mid-backup keeps the claim its run could not release (prune removes it).
async fn s3_objects(region: &SeaweedFs) -> Vec<(String, String)> {
    let mut objects = Vec::new();
    for key in region.keys(BUCKET, &format!("{PREFIX}/jobs/")).await {
        if key.contains("/claims/") {
            continue;
        }
        let bytes = region.object(BUCKET, &key).await;
        let key = key.strip_prefix(&format!("{PREFIX}/")).unwrap().to_string();
        objects.push((key, sha256_hex(&bytes)));
    }
    objects.sort();
    objects
}

fn list_json(config: &Path) -> serde_json::Value {
    let list = lifeboat(config, &["list", "maindb", "--format", "json"]);
    list.assert_code(0);
    serde_json::from_str(&list.stdout).unwrap()
}

fn names(value: &serde_json::Value) -> Vec<&str> {
    value
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_region_lost_mid_backup_is_named_and_replicated_when_back() {
    let region_a = SeaweedFs::start().await;
    let mut region_b = SeaweedFs::start().await;
    region_a.create_bucket(BUCKET).await;
    region_b.create_bucket(BUCKET).await;
    let source = Postgres::start();
    source.create_app_database(1_000_000);
    let work = tempfile::tempdir().unwrap();
    let repo = work.path().join("repo");
    let password_file = source.password_file(work.path(), &source.password);
    let config = Scenario::new(work.path())
        .local("local", &repo)
        .raw(&region_a.repository("a", BUCKET, PREFIX))
        .raw(&region_b.repository("b", BUCKET, PREFIX))
        .postgres_job(
            "maindb",
            &source.dsn("postgres"),
            &password_file,
            "databases = [\"app\"]",
        )
        .write();

    // One pass over the source lands identical objects in all three repositories.
    let child = lifeboat_command(&config)
        .args(["backup", "maindb"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let (argvs, status) = procs::watch(child);
    assert!(status.success());
    let dumps = argvs
        .values()
        .filter(|argv| argv.contains("pg_dump --format=custom"))
        .count();
    assert_eq!(dumps, 1, "the source is dumped once: {argvs:?}");
    let local = local_objects(&repo);
    assert_eq!(local.len(), 3, "{local:?}");
    assert_eq!(s3_objects(&region_a).await, local);
    assert_eq!(s3_objects(&region_b).await, local);

    // Region B goes away while the next backup is uploading.
    let log_path = work.path().join("degraded.log");
    let mut child = lifeboat_command(&config)
        .args(["backup", "maindb"])
        .stdout(std::fs::File::create(work.path().join("degraded.out")).unwrap())
        .stderr(std::fs::File::create(&log_path).unwrap())
        .spawn()
        .unwrap();
    let pg_dump =
        procs::wait_for_descendant(&mut child, |argv| argv.contains("pg_dump --format=custom"))
            .expect("pg_dump started");
    procs::wait_until_written(pg_dump, 16 * 1024 * 1024);
    region_b.stop();
    let status = child.wait().unwrap();
    let out = std::fs::read_to_string(work.path().join("degraded.out")).unwrap();
    let log = std::fs::read_to_string(&log_path).unwrap();
    assert_eq!(status.code(), Some(3), "{out}\n{log}");
    assert!(
        out.contains("(repositories: local, a)"),
        "committed in local and a: {out}"
    );
    assert!(
        out.contains("warning: repository 'b' lacks backup maindb/")
            && out.contains("lifeboat replicate maindb"),
        "{out}"
    );

    let listed = list_json(&config);
    let newest = &listed["rows"][0];
    assert_eq!(names(&newest["present_in"]), ["local", "a"]);
    assert_eq!(listed["unreachable"][0][0], "b", "{listed}");

    // B is back: it shows what it lacks, and replicate fills it in.
    region_b.restart().await;
    let listed = list_json(&config);
    let newest = &listed["rows"][0];
    assert_eq!(names(&newest["present_in"]), ["local", "a"]);
    let lacking: Vec<&str> = names(&newest["missing_from"])
        .into_iter()
        .chain(names(&newest["incomplete_in"]))
        .collect();
    assert_eq!(lacking, ["b"], "{listed}");
    assert_eq!(names(&listed["rows"][1]["present_in"]), ["local", "a", "b"]);

    let plan = lifeboat(&config, &["replicate", "maindb", "--dry-run"]);
    plan.assert_code(0);
    plan.assert_stdout_has("would copy");
    assert!(
        s3_objects(&region_b).await.len() < local_objects(&repo).len(),
        "a dry run copies nothing"
    );

    // The plan a dry run prints is what replicate then does, action by action.
    let planned = lifeboat(
        &config,
        &["replicate", "maindb", "--dry-run", "--format", "json"],
    );
    planned.assert_code(0);
    let replicate = lifeboat(&config, &["replicate", "maindb", "--format", "json"]);
    replicate.assert_code(0);
    let (planned, done): (serde_json::Value, serde_json::Value) = (
        serde_json::from_str(&planned.stdout).unwrap(),
        serde_json::from_str(&replicate.stdout).unwrap(),
    );
    assert_eq!(
        (&planned["dry_run"], &done["dry_run"]),
        (&true.into(), &false.into())
    );
    assert_eq!(planned["actions"], done["actions"], "{done:#}");
    let actions = done["actions"].as_array().unwrap();
    assert!(
        actions
            .iter()
            .any(|a| a["object"] == "manifest.json" && a["to"] == "b" && a["what"] == "copy"),
        "{done:#}"
    );
    assert_eq!(s3_objects(&region_b).await, local_objects(&repo));
    assert!(
        region_b.open_uploads(BUCKET).await.is_empty(),
        "the upload B was cut off in is aborted"
    );
    lifeboat(&config, &["verify", "maindb", "--from", "b"]).assert_code(0);
    let listed = list_json(&config);
    assert_eq!(names(&listed["rows"][0]["present_in"]), ["local", "a", "b"]);

    let again = lifeboat(&config, &["replicate", "maindb"]);
    again.assert_code(0);
    again.assert_stdout_has("nothing to copy");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restore_reads_on_from_the_next_region_holding_an_intact_copy() {
    let region_a = SeaweedFs::start().await;
    let region_b = SeaweedFs::start().await;
    region_a.create_bucket(BUCKET).await;
    region_b.create_bucket(BUCKET).await;
    let work = tempfile::tempdir().unwrap();
    let source = work.path().join("etc");
    tree::build(&source, 300, 2);
    let config = Scenario::new(work.path())
        .raw(&region_a.repository("a", BUCKET, PREFIX))
        .raw(&region_b.repository("b", BUCKET, PREFIX))
        .files_job("config", &[&source])
        .write();
    lifeboat(&config, &["backup", "config"]).assert_code(0);
    let object_key = region_a
        .keys(BUCKET, PREFIX)
        .await
        .into_iter()
        .find(|k| k.ends_with("/files.tar.zst"))
        .unwrap();

    // One flipped byte in region A's copy: the restore reads it from B and says so.
    let mut bytes = region_a.object(BUCKET, &object_key).await;
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x01;
    region_a
        .client()
        .put_object()
        .bucket(BUCKET)
        .key(&object_key)
        .body(ByteStream::from(bytes))
        .send()
        .await
        .unwrap();
    let into = work.path().join("restored-after-damage");
    let run = lifeboat(
        &config,
        &["restore", "config", "--into", into.to_str().unwrap()],
    );
    run.assert_code(0);
    assert!(
        run.stdout
            .contains("files.tar.zst: served by repository 'b' after 'a' failed")
            && run.stdout.contains("stored sha256"),
        "{}",
        run.stdout
    );
    run.assert_stdout_has("from repository 'b'");
    tree::assert_same(&source, &into.join(source.strip_prefix("/").unwrap()));

    // verify reads on too: A's copy is damaged, B's intact, so the backup is degraded (3);
    // A alone has no intact copy (1).
    let key = object_key.strip_prefix(&format!("{PREFIX}/")).unwrap();
    let verify = lifeboat(&config, &["verify", "config"]);
    verify.assert_code(3);
    assert!(
        verify.stdout.contains(&format!("DAMAGED  {key} in 'a'"))
            && verify.stdout.contains(&format!("ok       {key} in 'b'")),
        "{}",
        verify.stdout
    );
    lifeboat(&config, &["verify", "config", "--from", "a"]).assert_code(1);
    // replicate --verify replaces the damaged copy from B; then every copy checks out.
    let replicate = lifeboat(&config, &["replicate", "config", "--verify"]);
    replicate.assert_code(0);
    assert!(
        replicate.stdout.contains("replaced damaged config/")
            && replicate.stdout.contains("from 'b' into 'a'"),
        "{}",
        replicate.stdout
    );
    lifeboat(&config, &["verify", "config"]).assert_code(0);
    lifeboat(&config, &["verify", "config", "--from", "a"]).assert_code(0);

    // Region A's bucket is gone altogether: B still restores.
    region_a.delete_bucket_entirely(BUCKET).await;
    let into = work.path().join("restored-without-a");
    let run = lifeboat(
        &config,
        &["restore", "config", "--into", into.to_str().unwrap()],
    );
    run.assert_code(0);
    run.assert_stdout_has("from repository 'b'");
    tree::assert_same(&source, &into.join(source.strip_prefix("/").unwrap()));
    // A region that lost everything is not a smaller copy of the others: verify fails.
    let verify = lifeboat(&config, &["verify", "config"]);
    verify.assert_code(1);
    assert!(
        verify
            .stdout
            .contains("warning: repository 'a' could not be listed")
            && verify.stdout.contains("NOT WHOLE repository 'a'"),
        "{}",
        verify.stdout
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn below_min_repositories_nothing_is_committed_anywhere() {
    let mut region_a = SeaweedFs::start().await;
    let mut region_b = SeaweedFs::start().await;
    region_a.create_bucket(BUCKET).await;
    region_b.create_bucket(BUCKET).await;
    let work = tempfile::tempdir().unwrap();
    let repo = work.path().join("repo");
    let source = work.path().join("etc");
    tree::build(&source, 20, 0);
    let config = write_config(
        work.path(),
        &format!(
            "min_repositories = 2\n\n{}{}{}{}",
            local_repository("local", &repo),
            region_a.repository("a", BUCKET, PREFIX),
            region_b.repository("b", BUCKET, PREFIX),
            files_job("config", &[&source])
        ),
    );
    region_a.stop();
    region_b.stop();
    let run = lifeboat(&config, &["backup", "config"]);
    run.assert_code(1);
    assert!(
        run.stderr
            .contains("1 of 3 repositories can take it and min_repositories is 2"),
        "{}",
        run.stderr
    );
    assert!(
        run.stderr.contains("repository 'a'") && run.stderr.contains("repository 'b'"),
        "{}",
        run.stderr
    );
    let manifests: Vec<_> = walkdir::WalkDir::new(&repo)
        .into_iter()
        .filter_map(Result::ok)
        .filter(|e| e.file_name() == "manifest.json")
        .collect();
    assert!(manifests.is_empty(), "committed locally: {manifests:?}");

    // With one region back, two repositories take it: committed there, degraded.
    region_a.restart().await;
    let run = lifeboat(&config, &["backup", "config"]);
    run.assert_code(3);
    assert!(
        run.stdout.contains("(repositories: local, a)")
            && run.stdout.contains("repository 'b' lacks backup config/"),
        "{}",
        run.stdout
    );
}
