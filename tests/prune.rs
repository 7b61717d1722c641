//! `lifeboat prune` against real repositories: exactly the kept backups stay everywhere and
//! still restore (with the WAL they replay), a dry run changes nothing, a prune killed
//! halfway leaves every manifest whole and the next one finishes, and Object Lock keeps what
//! it protects without failing the run.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use crate::common::postgres::{Postgres, free_port};
use crate::common::{
    SeaweedFs, files_job, lifeboat, lifeboat_command, local_repository, write_config,
};
use crate::postgres_physical::{
    BUCKET, JOB, PREFIX, Restored, archiving_cluster, restore_started, shared_work_dir,
};

fn backup_id(config: &Path, job: &str) -> String {
    let show = lifeboat(
        config,
        &["show", "latest", "--job", job, "--format", "json"],
    );
    show.assert_code(0);
    let manifest: serde_json::Value = serde_json::from_str(&show.stdout).unwrap();
    manifest["id"].as_str().unwrap().to_string()
}

/// Takes a backup and returns its id; ids have one-second resolution, so backups of one job
/// are spaced at least that far apart.
fn take_backup(config: &Path, job: &str) -> String {
    std::thread::sleep(Duration::from_millis(1100));
    lifeboat(config, &["backup", job]).assert_code(0);
    backup_id(config, job)
}

/// Backup ids with a manifest among `keys` of `job`.
fn manifest_ids<'k>(keys: impl Iterator<Item = &'k String>, job: &str) -> BTreeSet<String> {
    let marker = format!("jobs/{job}/backups/");
    keys.filter_map(|key| {
        let rest = &key[key.find(&marker)? + marker.len()..];
        let (id, name) = rest.split_once('/')?;
        (name == "manifest.json").then(|| id.to_string())
    })
    .collect()
}

/// Ids with any key under their backup directory.
fn held_ids<'k>(keys: impl Iterator<Item = &'k String>, job: &str) -> BTreeSet<String> {
    let marker = format!("jobs/{job}/backups/");
    keys.filter_map(|key| {
        let rest = &key[key.find(&marker)? + marker.len()..];
        rest.split_once('/').map(|(id, _)| id.to_string())
    })
    .collect()
}

/// Archived WAL file names (without `.zst`) in a listing.
fn wal_names(listing: &BTreeMap<String, i64>) -> Vec<String> {
    listing
        .keys()
        .filter(|k| k.contains(&format!("jobs/{JOB}/wal/")))
        .map(|k| {
            k.rsplit('/')
                .next()
                .unwrap()
                .trim_end_matches(".zst")
                .to_string()
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prune_keeps_exactly_the_plan_in_three_repositories_and_kept_backups_still_restore() {
    const COLD: &str = "cold";
    let east = SeaweedFs::start().await;
    let west = SeaweedFs::start().await;
    east.create_bucket(BUCKET).await;
    east.create_bucket(COLD).await;
    west.create_bucket(BUCKET).await;
    let work = shared_work_dir();
    let cold = east.repository("cold", COLD, PREFIX);
    let (source, config) = archiving_cluster(work.path(), &[&east, &west], &cold);
    // The job block is last in the file: this line belongs to it.
    let mut text = std::fs::read_to_string(&config).unwrap();
    text.push_str("retention = { keep_last = 1 }\n");
    std::fs::write(&config, text).unwrap();
    let buckets: [(&SeaweedFs, &str); 3] = [(&east, COLD), (&east, BUCKET), (&west, BUCKET)];

    source.psql("postgres", "create table events (id int primary key)");
    let mut ids = Vec::new();
    for round in 0..4 {
        source.psql(
            "postgres",
            &format!(
                "insert into events select g from generate_series({}, {}) g",
                round * 1000 + 1,
                round * 1000 + 1000
            ),
        );
        ids.push(take_backup(&config, JOB));
    }
    // The second backup passed verify: prune must keep it although keep_last = 1 does not.
    lifeboat(&config, &["verify", JOB, "--backup", &ids[1]]).assert_code(0);
    source.psql(
        "postgres",
        "insert into events select g from generate_series(5001, 6000) g",
    );
    source.archive_current_wal();
    let expected_rows = source.psql("postgres", "select count(*) from events");
    let verified = ids[1].clone();
    let first_wal_of_verified = {
        let show = lifeboat(
            &config,
            &["show", &verified, "--job", JOB, "--format", "json"],
        );
        let manifest: serde_json::Value = serde_json::from_str(&show.stdout).unwrap();
        manifest["source"]["first_wal"]
            .as_str()
            .unwrap()
            .to_string()
    };

    // What an interrupted backup left: objects and no manifest.
    let leftover = "20200101T000000Z";
    east.client()
        .put_object()
        .bucket(BUCKET)
        .key(format!(
            "{PREFIX}/jobs/{JOB}/backups/{leftover}/base.tar.zst"
        ))
        .body(b"partial".to_vec().into())
        .send()
        .await
        .unwrap();

    let mut before = Vec::new();
    for (region, bucket) in buckets {
        before.push(region.listing(bucket, "").await);
    }
    for listing in &before {
        assert_eq!(
            manifest_ids(listing.keys(), JOB),
            ids.iter().cloned().collect()
        );
        assert!(
            wal_names(listing)
                .iter()
                .any(|name| name.len() >= 24 && name[..24] < *first_wal_of_verified),
            "WAL older than the verified backup was archived, so there is some to prune"
        );
    }

    let dry = lifeboat(&config, &["prune", "--dry-run"]);
    dry.assert_code(0);
    for removed in [&ids[0], &ids[2]] {
        assert!(
            dry.stdout
                .lines()
                .any(|l| l.contains(removed.as_str()) && l.contains("would remove")),
            "{}",
            dry.stdout
        );
    }
    for ((region, bucket), listing) in buckets.iter().zip(&before) {
        assert_eq!(
            &region.listing(bucket, "").await,
            listing,
            "a dry run changed {bucket}"
        );
    }

    // The plan a dry run prints is the one the prune then carries out, item by item.
    let prune = ["prune", "--grace", "0s", "--format", "json"];
    let planned = lifeboat(&config, &[&prune[..], &["--dry-run"]].concat());
    planned.assert_code(0);
    let run = lifeboat(&config, &prune);
    run.assert_code(0);
    let (planned, done): (serde_json::Value, serde_json::Value) = (
        serde_json::from_str(&planned.stdout).unwrap(),
        serde_json::from_str(&run.stdout).unwrap(),
    );
    assert_eq!(planned["dry_run"], true);
    assert_eq!(done["dry_run"], false);
    assert_eq!(plan_of(&planned), plan_of(&done));
    let backups = done["jobs"][0]["backups"].as_array().unwrap();
    assert!(
        backups.iter().any(|b| b["id"] == verified.as_str()
            && b["reasons"]
                .as_array()
                .unwrap()
                .iter()
                .any(|r| r == "newest verified")),
        "{done:#}"
    );
    let removed_wal: u64 = done["jobs"][0]["wal"]["repositories"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["removed"].as_u64().unwrap())
        .sum();
    assert!(removed_wal > 0, "{done:#}");
    let leftovers = done["jobs"][0]["leftovers"].as_array().unwrap();
    assert!(
        leftovers.len() == 1 && leftovers[0]["id"] == leftover && leftovers[0]["removed"] == true,
        "{done:#}"
    );
    let kept: BTreeSet<String> = [ids[1].clone(), ids[3].clone()].into();
    for (region, bucket) in buckets {
        let after = region.listing(bucket, "").await;
        assert_eq!(
            manifest_ids(after.keys(), JOB),
            kept,
            "manifests in {bucket}"
        );
        assert_eq!(held_ids(after.keys(), JOB), kept, "objects in {bucket}");
        assert!(
            !after
                .keys()
                .any(|k| k.ends_with("/prune.json") || k.contains("/prune/")),
            "the journal of a finished prune is gone"
        );
        let wal = wal_names(&after);
        assert!(!wal.is_empty());
        for name in wal.iter().filter(|n| !n.ends_with(".history")) {
            assert!(
                name[..24] >= *first_wal_of_verified,
                "{name} in {bucket} predates every kept backup and should be gone"
            );
        }
    }

    // Each kept backup restores, replaying the WAL archive to its end.
    for id in kept {
        let data_dir = work.path().join(format!("restored-{id}"));
        let port = free_port();
        let _restored = Restored(data_dir.clone());
        restore_started(&config, &data_dir, port, &["--backup", &id]).assert_code(0);
        let restored = Postgres::attach(port, &source.password);
        assert_eq!(
            restored.psql("postgres", "select count(*) from events"),
            expected_rows,
            "rows after restoring {id} and replaying the archive"
        );
    }
}

/// A prune report without what only applying it tells (what was done, retained, failed):
/// the plan it carried out.
fn plan_of(report: &serde_json::Value) -> serde_json::Value {
    let mut plan = report.clone();
    plan.as_object_mut().unwrap().remove("dry_run");
    for job in plan["jobs"].as_array_mut().unwrap() {
        let job = job.as_object_mut().unwrap();
        for done in ["recorded", "versions_removed", "failures"] {
            job.remove(done);
        }
        let drop = |items: &mut serde_json::Value, fields: &[&str]| {
            for item in items.as_array_mut().into_iter().flatten() {
                for field in fields {
                    item.as_object_mut().unwrap().remove(*field);
                }
            }
        };
        drop(&mut job["backups"], &["retained"]);
        drop(&mut job["leftovers"], &["removed", "retained"]);
        drop(&mut job["stale_uploads"], &["aborted"]);
        drop(&mut job["stale_claims"], &["removed"]);
        if job["wal"].is_object() {
            drop(&mut job["wal"]["repositories"], &["retained", "versions"]);
        }
    }
    plan
}

/// Every manifest in the listing names objects that are there at their recorded size.
fn assert_manifests_whole(
    place: &str,
    listing: &BTreeMap<String, i64>,
    read: impl Fn(&str) -> Vec<u8>,
) {
    for key in listing.keys().filter(|k| k.ends_with("/manifest.json")) {
        let manifest: serde_json::Value = serde_json::from_slice(&read(key)).unwrap();
        let dir = key.trim_end_matches("manifest.json");
        for object in manifest["objects"].as_array().unwrap() {
            let object_key = format!("{dir}{}", object["name"].as_str().unwrap());
            assert_eq!(
                listing.get(&object_key).copied(),
                object["size"].as_i64(),
                "{key} in {place} points to {object_key}"
            );
        }
    }
}

fn local_listing(root: &Path) -> BTreeMap<String, i64> {
    // A prune may be removing what this walks: what vanishes under the walk is left out.
    let vanished = |e: &walkdir::Error| {
        e.io_error()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::NotFound)
    };
    walkdir::WalkDir::new(root)
        .into_iter()
        .filter_map(|entry| match entry {
            Ok(entry) => Some(entry),
            Err(e) if vanished(&e) => None,
            Err(e) => panic!("unable to list '{}': {e}", root.display()),
        })
        .filter(|e| e.file_type().is_file())
        .filter_map(|e| {
            let size = match e.metadata() {
                Ok(meta) => meta.len() as i64,
                Err(err) if vanished(&err) => return None,
                Err(err) => panic!("unable to read '{}': {err}", e.path().display()),
            };
            let key = e
                .path()
                .strip_prefix(root)
                .unwrap()
                .to_str()
                .unwrap()
                .to_string();
            Some((key, size))
        })
        .collect()
}

/// Starts a prune and kills it with SIGKILL as soon as `started` says it has removed
/// something; returns whether the kill came before the prune ended on its own.
fn kill_prune_when(config: &Path, started: impl Fn() -> bool) -> bool {
    let child = lifeboat_command(config)
        .arg("prune")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    crate::common::procs::kill_when(child, started, "prune")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prune_killed_halfway_leaves_every_manifest_whole_and_the_next_one_finishes() {
    const FILES: &str = "conf";
    let east = SeaweedFs::start().await;
    let west = SeaweedFs::start().await;
    east.create_bucket(BUCKET).await;
    west.create_bucket(BUCKET).await;
    let work = tempfile::tempdir().unwrap();
    let tree = work.path().join("etc");
    std::fs::create_dir_all(&tree).unwrap();
    let local = work.path().join("local");
    let config = write_config(
        work.path(),
        &format!(
            "{}{}{}{}\nretention = {{ keep_last = 2 }}\n",
            local_repository("local", &local),
            east.repository("east", BUCKET, PREFIX),
            west.repository("west", BUCKET, PREFIX),
            files_job(FILES, &[&tree]).trim_end()
        ),
    );
    let mut ids = Vec::new();
    for n in 0..12 {
        std::fs::write(tree.join("app.conf"), format!("generation = {n}\n")).unwrap();
        ids.push(take_backup(&config, FILES));
    }
    let count_local = || manifest_ids(local_listing(&local).keys(), FILES).len();

    // Killed right after its first removal in the first repository ...
    assert!(kill_prune_when(&config, || count_local() < ids.len()));
    let check_whole = || async {
        let listing = local_listing(&local);
        assert_manifests_whole("local", &listing, |k| std::fs::read(local.join(k)).unwrap());
        for (name, region) in [("east", &east), ("west", &west)] {
            let listing = region.listing(BUCKET, "").await;
            let mut objects = BTreeMap::new();
            for key in listing.keys().filter(|k| k.ends_with("/manifest.json")) {
                objects.insert(key.clone(), region.object(BUCKET, key).await);
            }
            assert_manifests_whole(name, &listing, |k| objects[k].clone());
        }
    };
    check_whole().await;
    let local_after_first = count_local();
    assert!(local_after_first < ids.len() && local_after_first > 2);

    // ... and again once it reaches the last repository.
    let west_handle = tokio::runtime::Handle::current();
    let west_count = || {
        let listing = std::thread::scope(|s| {
            s.spawn(|| west_handle.block_on(west.listing(BUCKET, "")))
                .join()
                .unwrap()
        });
        manifest_ids(listing.keys(), FILES).len()
    };
    let killed = kill_prune_when(&config, || west_count() < ids.len());
    assert!(killed, "the second prune was stopped before it finished");
    check_whole().await;

    // Leftovers the next prune also clears: an abandoned upload and an interrupted backup
    // directory, both older than the grace period given.
    let upload_key = format!("{PREFIX}/jobs/{FILES}/backups/20200101T000000Z/files.tar.zst");
    east.client()
        .create_multipart_upload()
        .bucket(BUCKET)
        .key(&upload_key)
        .send()
        .await
        .unwrap();
    let abandoned = local.join(format!("jobs/{FILES}/backups/20200102T000000Z"));
    std::fs::create_dir_all(&abandoned).unwrap();
    std::fs::write(abandoned.join("files.tar.zst"), b"half a backup").unwrap();
    // And the claim on a backup id its run, killed, never released.
    let claims = local.join(format!("jobs/{FILES}/claims"));
    std::fs::create_dir_all(&claims).unwrap();
    let claim = claims.join("20200103T000000Z.json");
    std::fs::write(&claim, b"{}").unwrap();
    // Written two hours ago: prune never takes a claim younger than an hour.
    filetime::set_file_mtime(
        &claim,
        filetime::FileTime::from_unix_time(chrono::Utc::now().timestamp() - 7200, 0),
    )
    .unwrap();
    let young = claims.join("20200104T000000Z.json");
    std::fs::write(&young, b"{}").unwrap();
    std::thread::sleep(Duration::from_secs(3));

    let run = lifeboat(&config, &["prune", "--grace", "2s"]);
    run.assert_code(0);
    run.assert_stdout_has("incomplete upload of");
    run.assert_stdout_has("leftover 20200102T000000Z in 'local'");
    assert!(
        run.stdout
            .contains("claim of backup id 20200103T000000Z in 'local' left by a run that did not finish: removed"),
        "{}",
        run.stdout
    );
    assert!(!claim.exists());
    assert!(
        young.exists(),
        "a claim written a moment ago stays, whatever --grace says"
    );
    check_whole().await;
    let kept: BTreeSet<String> = ids[ids.len() - 2..].iter().cloned().collect();
    let local_keys = local_listing(&local);
    assert_eq!(manifest_ids(local_keys.keys(), FILES), kept);
    assert_eq!(held_ids(local_keys.keys(), FILES), kept);
    for region in [&east, &west] {
        let listing = region.listing(BUCKET, "").await;
        assert_eq!(manifest_ids(listing.keys(), FILES), kept);
        assert_eq!(held_ids(listing.keys(), FILES), kept);
        assert!(
            !listing
                .keys()
                .any(|k| k.ends_with("/prune.json") || k.contains("/prune/"))
        );
        assert!(region.open_uploads(BUCKET).await.is_empty());
    }
    // The kept backups restore byte for byte.
    let restored = work.path().join("restored");
    lifeboat(
        &config,
        &[
            "restore",
            FILES,
            "--backup",
            &ids[ids.len() - 1],
            "--into",
            restored.to_str().unwrap(),
        ],
    )
    .assert_code(0);
    let found = walkdir::WalkDir::new(&restored)
        .into_iter()
        .map(Result::unwrap)
        .find(|e| e.file_name() == "app.conf")
        .unwrap();
    assert_eq!(
        std::fs::read_to_string(found.path()).unwrap(),
        "generation = 11\n"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn object_lock_keeps_locked_backups_and_prune_reports_them_retained() {
    const LOCKED: &str = "vault";
    const PLAIN: &str = "plain";
    let region = SeaweedFs::start().await;
    region
        .client()
        .create_bucket()
        .bucket(LOCKED)
        .object_lock_enabled_for_bucket(true)
        .send()
        .await
        .unwrap();
    region.create_bucket(PLAIN).await;
    let work = tempfile::tempdir().unwrap();
    let tree = work.path().join("etc");
    std::fs::create_dir_all(&tree).unwrap();
    let lock = "\nobject_lock = { mode = \"governance\", days = 1 }\n\n";
    let config = write_config(
        work.path(),
        &format!(
            "{}{lock}{}\nretention = {{ keep_last = 1 }}\n",
            region.repository("vault", LOCKED, PREFIX).trim_end(),
            files_job("conf", &[&tree]).trim_end()
        ),
    );
    let check = lifeboat(&config, &["check"]);
    check.assert_code(0);
    check.assert_stdout_has("Object Lock: enforced");

    let mut ids = Vec::new();
    for n in 0..3 {
        std::fs::write(tree.join("app.conf"), format!("generation = {n}\n")).unwrap();
        ids.push(take_backup(&config, "conf"));
    }
    let object = format!("{PREFIX}/jobs/conf/backups/{}/manifest.json", ids[0]);
    let head = region
        .client()
        .head_object()
        .bucket(LOCKED)
        .key(&object)
        .send()
        .await
        .unwrap();
    let until = head
        .object_lock_retain_until_date()
        .expect("written locked");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    assert!(
        until.secs() > now + 23 * 3600,
        "locked for the configured day"
    );

    let before = region.listing(LOCKED, "").await;
    let run = lifeboat(&config, &["prune"]);
    run.assert_code(0);
    for old in &ids[..2] {
        assert!(
            run.stdout
                .lines()
                .any(|l| l.contains(old.as_str()) && l.contains("RETAINED in vault")),
            "{}",
            run.stdout
        );
    }
    // Nothing was hidden behind a delete marker either: every backup is still listed whole.
    assert_eq!(region.listing(LOCKED, "").await, before);
    let versions = region
        .client()
        .list_object_versions()
        .bucket(LOCKED)
        .send()
        .await
        .unwrap();
    assert!(versions.delete_markers().is_empty(), "{versions:?}");
    let list = lifeboat(&config, &["list", "conf"]);
    for id in &ids {
        list.assert_stdout_has(id.as_str());
    }

    // Configured, but the bucket cannot lock: check says so instead of trusting it.
    let plain_dir = work.path().join("plain-config");
    std::fs::create_dir_all(&plain_dir).unwrap();
    let plain = write_config(
        &plain_dir,
        &format!(
            "{}{lock}{}",
            region.repository("plain", PLAIN, PREFIX).trim_end(),
            files_job("conf", &[&tree])
        ),
    );
    let check = lifeboat(&plain, &["check"]);
    check.assert_code(1);
    check.assert_stdout_has("does not have Object Lock enabled");
}

#[test]
fn prune_refuses_a_plan_that_would_remove_every_backup() {
    let work = tempfile::tempdir().unwrap();
    let tree = work.path().join("etc");
    std::fs::create_dir_all(&tree).unwrap();
    std::fs::write(tree.join("app.conf"), "x = 1\n").unwrap();
    let local = work.path().join("local");
    let config = write_config(
        work.path(),
        &format!(
            "{}{}\nretention = {{ keep_within = \"2s\" }}\n",
            local_repository("local", &local),
            files_job("conf", &[&tree]).trim_end()
        ),
    );
    let ids = [take_backup(&config, "conf"), take_backup(&config, "conf")];
    // Backups stopped: the window now holds none of them.
    std::thread::sleep(Duration::from_secs(3));
    let run = lifeboat(&config, &["prune"]);
    run.assert_code(1);
    run.assert_stderr_has("prune refused");
    run.assert_stdout_has("REFUSED");
    assert_eq!(
        manifest_ids(local_listing(&local).keys(), "conf"),
        ids.into_iter().collect()
    );
}

/// A backup whose manifest no repository can read is reported as damaged and kept, never
/// removed as an old backup: what its objects hold may still be recovered.
#[test]
fn a_backup_with_an_unreadable_manifest_is_kept_as_damaged() {
    let work = tempfile::tempdir().unwrap();
    let tree = work.path().join("etc");
    std::fs::create_dir_all(&tree).unwrap();
    std::fs::write(tree.join("app.conf"), "x = 1\n").unwrap();
    let local = work.path().join("local");
    let config = write_config(
        work.path(),
        &format!(
            "{}{}\nretention = {{ keep_last = 1 }}\n",
            local_repository("local", &local),
            files_job("conf", &[&tree]).trim_end()
        ),
    );
    let old = take_backup(&config, "conf");
    let new = take_backup(&config, "conf");
    let manifest = local.join(format!("jobs/conf/backups/{old}/manifest.json"));
    std::fs::write(&manifest, b"{ damaged").unwrap();
    let run = lifeboat(&config, &["prune"]);
    run.assert_code(0);
    assert!(
        run.stdout
            .contains("damaged: no repository holds a readable manifest"),
        "{}",
        run.stdout
    );
    assert_eq!(
        manifest_ids(local_listing(&local).keys(), "conf"),
        [old.clone(), new.clone()].into_iter().collect()
    );

    // Nor does a damaged newest backup take the retention slot of one that restores.
    let newest = take_backup(&config, "conf");
    let manifest = local.join(format!("jobs/conf/backups/{newest}/manifest.json"));
    std::fs::write(&manifest, b"{ damaged too").unwrap();
    let run = lifeboat(&config, &["prune"]);
    run.assert_code(0);
    assert_eq!(
        manifest_ids(local_listing(&local).keys(), "conf"),
        [old, new, newest].into_iter().collect(),
        "{}",
        run.stdout
    );
}
