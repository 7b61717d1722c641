//! The whole restorable window, proven per repository: a physical job archiving into two S3
//! regions and a local repository, three base backups, over 60 segments and a second
//! timeline. `verify --archive` names a segment lost in one region and a history file lost
//! in another with the recovery range each cuts, `status` goes CRITICAL on them, the
//! metrics show each region's window, `replicate` repairs both, and the next run reads only
//! what is new; a segment damaged after it was proven is read again and named. A 10% sample
//! reads every object of every repository exactly once in ten runs.

use std::path::Path;

use serde_json::Value;

use crate::common::postgres::{Postgres, free_port};
use crate::common::{SeaweedFs, is_root, lifeboat, local_repository};
use crate::postgres_physical::{
    BUCKET, JOB, PREFIX, Restored, archive_from_restored_copies, archiving_cluster, insert_events,
    postgres_user, restore_started, shared_work_dir,
};

fn checks_by_repository(run: &crate::common::Run) -> Vec<(String, Value)> {
    let report: Value = serde_json::from_str(&run.stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}):\n{}\n{}", run.stdout, run.stderr));
    report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|check| {
            (
                check["repository"].as_str().unwrap().to_string(),
                check.clone(),
            )
        })
        .collect()
}

fn check_of<'a>(checks: &'a [(String, Value)], repository: &str) -> &'a Value {
    &checks
        .iter()
        .find(|(name, _)| name == repository)
        .unwrap()
        .1
}

async fn delete(region: &SeaweedFs, key: &str) {
    region
        .client()
        .delete_object()
        .bucket(BUCKET)
        .key(format!("{PREFIX}/{key}"))
        .send()
        .await
        .unwrap();
}

fn recovery_point_of_newest(vault: &Path) -> chrono::DateTime<chrono::Utc> {
    let backups = vault.join(format!("jobs/{JOB}/backups"));
    let newest = std::fs::read_dir(&backups)
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .max()
        .unwrap();
    let manifest: Value =
        serde_json::from_slice(&std::fs::read(newest.join("manifest.json")).unwrap()).unwrap();
    manifest["recovery_point"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_regions_window_is_proven_and_its_gaps_named_repaired_and_read_again() {
    let region1 = SeaweedFs::start().await;
    let region2 = SeaweedFs::start().await;
    region1.create_bucket(BUCKET).await;
    region2.create_bucket(BUCKET).await;
    let work = shared_work_dir();
    let vault = work.path().join("vault");
    let metrics = work.path().join("metrics");
    // wal-push runs as the cluster's owner, backups as root: the WAL directory is the
    // owner's.
    let wal_dir = vault.join(format!("jobs/{JOB}/wal"));
    std::fs::create_dir_all(&wal_dir).unwrap();
    std::fs::create_dir(&metrics).unwrap();
    if is_root() {
        let (uid, gid) = postgres_user();
        for dir in wal_dir.ancestors().take(4).chain([metrics.as_path()]) {
            std::os::unix::fs::chown(dir, Some(uid), Some(gid)).unwrap();
        }
    }
    let extra = format!(
        "metrics_dir = \"{}\"\n{}",
        metrics.display(),
        local_repository("vault", &vault)
    );
    let (mut source, config) = archiving_cluster(work.path(), &[&region1, &region2], &extra);
    archive_from_restored_copies(&source);
    source.psql("postgres", "create table events (id int primary key)");
    // The first wal-push marks the vault as the owner, before a backup does as root.
    source.archive_current_wal();
    let mut segments = Vec::new();
    for backup in 0..3 {
        lifeboat(&config, &["backup", JOB]).assert_code(0);
        for batch in 0..20 {
            let first = backup * 1000 + batch * 10 + 1;
            insert_events(&source, first, first + 9);
            segments.push(source.archive_current_wal());
        }
    }
    let newest_backup_at = recovery_point_of_newest(&vault);
    // Timeline 2: the end of the archive restored, promoted, and writing on.
    source.stop();
    let promoted_dir = work.path().join("timeline2");
    let port = free_port();
    let _promoted = Restored(promoted_dir.clone());
    restore_started(&config, &promoted_dir, port, &["--keep-archiving"]).assert_code(0);
    let promoted = Postgres::attach(port, &source.password);
    insert_events(&promoted, 5001, 5100);
    let on_timeline2 = promoted.archive_current_wal();
    assert!(on_timeline2.starts_with("00000002"), "{on_timeline2}");
    crate::common::postgres::stop_data_dir(&promoted_dir);

    // Whole: every file of every repository read and proven.
    let first = lifeboat(&config, &["verify", "--archive", "--format", "json"]);
    first.assert_code(0);
    let checks = checks_by_repository(&first);
    assert_eq!(checks.len(), 3, "{}", first.stdout);
    for (name, check) in &checks {
        assert!(
            check["files_listed"].as_u64().unwrap() >= 64,
            "{name}: {check}"
        );
        assert_eq!(
            check["files_read"], check["files_listed"],
            "{name}: {check}"
        );
        assert_eq!(check["full"], true, "{name}");
        assert_eq!(
            check["window"]["gaps"],
            serde_json::json!([]),
            "{name}: {check}"
        );
        assert_eq!(check["window"]["backups"], 3, "{name}: {check}");
    }

    // A segment between the second and third backups lost in region 1, the history of
    // timeline 2 lost in region 2.
    let lost = &segments[30];
    delete(&region1, &format!("jobs/{JOB}/wal/00000001/{lost}.zst")).await;
    delete(
        &region2,
        &format!("jobs/{JOB}/wal/00000002/00000002.history.zst"),
    )
    .await;
    let broken = lifeboat(&config, &["verify", "--archive", "--format", "json"]);
    broken.assert_code(1);
    let checks = checks_by_repository(&broken);
    let gap1 = &check_of(&checks, "region1")["window"]["gaps"];
    assert_eq!(gap1.as_array().unwrap().len(), 1, "{gap1}");
    assert_eq!(gap1[0]["first_missing"], lost.as_str());
    assert_eq!(gap1[0]["last_missing"], lost.as_str());
    let at = |value: &Value| {
        value
            .as_str()
            .unwrap()
            .parse::<chrono::DateTime<chrono::Utc>>()
            .unwrap()
    };
    // Recovery to the moments after the segment before it, up to the third backup, is lost.
    assert_eq!(at(&gap1[0]["lost_to"]), newest_backup_at, "{gap1}");
    assert!(at(&gap1[0]["lost_from"]) < newest_backup_at, "{gap1}");
    let gap2 = &check_of(&checks, "region2")["window"]["gaps"];
    assert_eq!(gap2[0]["first_missing"], "00000002.history", "{gap2}");
    assert_eq!(gap2[0]["lost_to"], Value::Null, "{gap2}");
    assert_eq!(
        check_of(&checks, "vault")["window"]["gaps"],
        serde_json::json!([])
    );
    // Nothing new was archived: nothing is read again.
    for (name, check) in &checks {
        assert_eq!(check["files_read"], 0, "{name}: {check}");
    }
    let text = lifeboat(&config, &["verify", "--archive"]);
    text.assert_code(1);
    text.assert_stdout_has(format!(
        "GAP      WAL segment {lost} is missing: point-in-time recovery from "
    ));
    text.assert_stdout_has("is impossible in repository 'region1'");
    text.assert_stdout_has(
        "GAP      timeline history file 00000002.history is missing: point-in-time recovery from ",
    );
    text.assert_stdout_has("on (until a new base backup) is impossible in repository 'region2'");

    let status = lifeboat(&config, &["status", "--format", "json"]);
    let report: Value = serde_json::from_str(&status.stdout).unwrap();
    assert_eq!(report["state"], "CRITICAL", "{}", status.stdout);
    let problems = report["jobs"][0]["problems"].to_string();
    assert!(
        problems.contains(&format!("WAL segment {lost} is missing"))
            && problems.contains("in repository 'region1'")
            && problems.contains("00000002.history is missing")
            && problems.contains("in repository 'region2'"),
        "{problems}"
    );
    assert_eq!(report["jobs"][0]["windows"].as_array().unwrap().len(), 3);
    let listed = lifeboat(&config, &["list", "--format", "json"]);
    let listed: Value = serde_json::from_str(&listed.stdout).unwrap();
    let windows = listed["windows"].as_array().unwrap();
    let region1 = windows
        .iter()
        .find(|w| w["repository"] == "region1")
        .unwrap();
    assert_eq!(region1["job"], JOB);
    assert_eq!(
        region1["gaps"][0]["first_missing"],
        lost.as_str(),
        "{region1}"
    );
    lifeboat(&config, &["list"]).assert_stdout_has(format!(
        "  GAP WAL segment {lost} is missing: point-in-time recovery from "
    ));
    let prom = std::fs::read_to_string(metrics.join("lifeboat.prom")).unwrap();
    for (repository, gaps) in [("region1", 1), ("region2", 1), ("vault", 0)] {
        let labels = format!("{{job=\"{JOB}\",repository=\"{repository}\"}}");
        assert!(
            prom.contains(&format!("lifeboat_window_gaps{labels} {gaps}\n")),
            "{prom}"
        );
        assert!(prom.contains(&format!("lifeboat_window_start_timestamp_seconds{labels} ")));
        assert!(prom.contains(&format!("lifeboat_window_end_timestamp_seconds{labels} ")));
    }
    assert!(!prom.contains(&format!(
        "lifeboat_archive_verified_timestamp_seconds{{job=\"{JOB}\",repository=\"vault\"}} 0\n"
    )));

    // Repaired from the regions that hold them; the next run reads exactly those two.
    lifeboat(&config, &["replicate", JOB]).assert_code(0);
    let repaired = lifeboat(&config, &["verify", "--archive", "--format", "json"]);
    repaired.assert_code(0);
    let checks = checks_by_repository(&repaired);
    for (repository, read) in [("region1", 1), ("region2", 1), ("vault", 0)] {
        let check = check_of(&checks, repository);
        assert_eq!(check["files_read"], read, "{repository}: {check}");
        assert_eq!(
            check["window"]["gaps"],
            serde_json::json!([]),
            "{repository}"
        );
    }
    lifeboat(&config, &["verify", "--archive"])
        .assert_code(0)
        .assert_stdout_has("0 gap(s), 0 damaged file(s), 0 file(s) read");

    // A proven segment damaged in place is stored later than the proof: read and named.
    let damaged = vault.join(format!("jobs/{JOB}/wal/00000001/{}.zst", segments[10]));
    let mut bytes = std::fs::read(&damaged).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0xff;
    std::thread::sleep(std::time::Duration::from_millis(1100));
    std::fs::write(&damaged, &bytes).unwrap();
    let caught = lifeboat(&config, &["verify", "--archive", "--from", "vault"]);
    caught.assert_code(1);
    caught.assert_stdout_has(format!(
        "DAMAGED  jobs/{JOB}/wal/00000001/{}.zst",
        segments[10]
    ));
    caught.assert_stdout_has("1 file(s) read");
    caught.assert_stderr_has("remove the damaged copy the DAMAGED line names");
    let full = lifeboat(
        &config,
        &[
            "verify",
            "--archive",
            "--from",
            "vault",
            "--full",
            "--format",
            "json",
        ],
    );
    full.assert_code(1);
    let checks = checks_by_repository(&full);
    let vault_check = check_of(&checks, "vault");
    assert_eq!(vault_check["files_read"], vault_check["files_listed"]);
    assert_eq!(vault_check["damaged"].as_array().unwrap().len(), 1);
    // Recovery from the vault would stop at the damaged copy: a gap there, and in status.
    assert_eq!(
        vault_check["window"]["gaps"][0]["first_missing"],
        segments[10].as_str(),
        "{vault_check}"
    );
    lifeboat(&config, &["status"]).assert_stdout_has(format!(
        "WAL segment {} is missing: point-in-time recovery from ",
        segments[10]
    ));
    // The way the hint says: the damaged copy removed, replicate brings an intact one.
    std::fs::remove_file(&damaged).unwrap();
    lifeboat(&config, &["replicate", JOB]).assert_code(0);
    lifeboat(&config, &["verify", "--archive", "--from", "vault"])
        .assert_code(0)
        .assert_stdout_has("0 gap(s), 0 damaged file(s), 1 file(s) read");
}

/// The keys `verify --sample` reads in one repository: every committed backup's manifest
/// and objects.
fn backup_keys(repository: &Path) -> std::collections::BTreeSet<String> {
    let backups = repository.join("jobs/config/backups");
    let mut keys = std::collections::BTreeSet::new();
    for backup in std::fs::read_dir(&backups).unwrap() {
        for object in std::fs::read_dir(backup.unwrap().path()).unwrap() {
            let path = object.unwrap().path();
            keys.insert(path.strip_prefix(repository).unwrap().display().to_string());
        }
    }
    keys
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ten_percent_sample_reads_every_object_of_every_repository_once_per_cycle() {
    let s3 = SeaweedFs::start().await;
    s3.create_bucket("sampled").await;
    let work = tempfile::tempdir().unwrap();
    let source = work.path().join("etc");
    crate::common::tree::build(&source, 20, 0);
    let local = work.path().join("local");
    let config = crate::common::Scenario::new(work.path())
        .local("local", &local)
        .raw(&s3.repository("s3", "sampled", "p"))
        .files_job("config", &[&source])
        .write();
    for _ in 0..12 {
        lifeboat(&config, &["backup", "config"]).assert_code(0);
    }
    let keys = backup_keys(&local);
    assert_eq!(keys.len(), 24, "{keys:?}");
    for cycle in 0..2 {
        let mut read: std::collections::BTreeMap<(String, String), usize> = Default::default();
        for run in 0..10 {
            let sampled = lifeboat(&config, &["verify", "--sample", "10%", "--format", "json"]);
            sampled.assert_code(0);
            for (repository, check) in checks_by_repository(&sampled) {
                assert_eq!(check["slice"], run, "cycle {cycle}: {check}");
                assert_eq!(check["objects"], 24, "{check}");
                for key in check["read"].as_array().unwrap() {
                    *read
                        .entry((repository.clone(), key.as_str().unwrap().to_string()))
                        .or_default() += 1;
                }
                if run == 9 {
                    assert_eq!(check["proven_share"], 1.0, "{check}");
                }
            }
        }
        for repository in ["local", "s3"] {
            let seen: std::collections::BTreeSet<String> = read
                .iter()
                .filter(|((r, _), _)| r == repository)
                .map(|((_, key), count)| {
                    assert_eq!(
                        *count, 1,
                        "cycle {cycle}: {repository} read {key} {count} times"
                    );
                    key.clone()
                })
                .collect();
            assert_eq!(seen, keys, "cycle {cycle}: {repository}");
        }
    }
    // A byte flipped in one object: the run whose slice holds it names it.
    let damaged_key = keys.iter().find(|k| k.ends_with("files.tar.zst")).unwrap();
    let path = local.join(damaged_key);
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[10] ^= 1;
    std::fs::write(&path, bytes).unwrap();
    let mut named = false;
    for _ in 0..10 {
        let run = lifeboat(&config, &["verify", "--sample", "10%", "--from", "local"]);
        if run.stdout.contains(&format!("DAMAGED  {damaged_key}")) {
            run.assert_code(1);
            named = true;
        } else {
            run.assert_code(0);
        }
    }
    assert!(named, "no run of a whole cycle named the damaged object");
    let status = lifeboat(
        &config,
        &[
            "verify", "--sample", "10%", "--from", "local", "--format", "json",
        ],
    );
    let share = checks_by_repository(&status)[0].1["proven_share"]
        .as_f64()
        .unwrap();
    assert!(
        share < 1.0,
        "the damaged object's slice counts as proven: {share}"
    );
}

/// A 16 MiB segment of timeline `timeline` as a WAL switch leaves it: PostgreSQL 15's long
/// page header, then zeros; stored as lifeboat stores it.
fn switched_segment(timeline: u32, segment: u64) -> Vec<u8> {
    let size: u32 = 16 << 20;
    let header = [
        &0xD110u16.to_le_bytes()[..],
        &2u16.to_le_bytes(),
        &timeline.to_le_bytes(),
        &(segment * u64::from(size)).to_le_bytes(),
        &0u32.to_le_bytes(),
        &[0; 4],
        &crate::common::tree::FAKE_SYSTEM.to_le_bytes(),
        &size.to_le_bytes(),
        &8192u32.to_le_bytes(),
    ]
    .concat();
    let mut raw = vec![0u8; size as usize];
    raw[..header.len()].copy_from_slice(&header);
    zstd::encode_all(&raw[..], 1).unwrap()
}

fn segment_name(timeline: u32, segment: u64) -> String {
    format!("{timeline:08X}{:08X}{:08X}", segment / 256, segment % 256)
}

/// A local repository of the physical job `db` written by hand: its marker, one base backup
/// needing segments `needs`, and the segments `held`.
fn hand_made(root: &Path, needs: (u64, u64), held: &[u64]) -> std::path::PathBuf {
    let job = root.join("repo/jobs/db");
    let wal = job.join("wal/00000001");
    std::fs::create_dir_all(&wal).unwrap();
    std::fs::write(
        root.join("repo/lifeboat.json"),
        r#"{"format":1,"created_at":"2026-01-01T00:00:00Z","created_by":"test"}"#,
    )
    .unwrap();
    let backup = job.join("backups/20260101T000000Z");
    std::fs::create_dir_all(&backup).unwrap();
    std::fs::write(backup.join("base.tar.zst"), b"base").unwrap();
    let manifest = serde_json::json!({
        "format": 1, "id": "20260101T000000Z", "job": "db", "kind": "postgres-physical",
        "started_at": "2026-01-01T00:00:00Z", "finished_at": "2026-01-01T00:00:00Z",
        "recovery_point": "2026-01-01T00:00:00Z", "tool_version": "test", "host": "test",
        "source": {
            "server_version": "15", "system_identifier": crate::common::tree::FAKE_SYSTEM.to_string(),
            "databases": [], "start_lsn": format!("0/{:X}", needs.0 << 24),
            "stop_lsn": format!("0/{:X}", (needs.1 << 24) + 0x100), "timeline": 1,
            "first_wal": segment_name(1, needs.0), "last_wal": segment_name(1, needs.1),
            "wal_segment_size": 16 << 20
        },
        "objects": [{"name": "base.tar.zst", "size": 4, "sha256": "0".repeat(64), "raw_size": 4,
                     "raw_sha256": "0".repeat(64), "compression": "zstd", "encryption": null}]
    });
    let manifest: lifeboat::manifest::Manifest = serde_json::from_value(manifest).unwrap();
    std::fs::write(backup.join("manifest.json"), manifest.to_json()).unwrap();
    for segment in held {
        std::fs::write(
            wal.join(format!("{}.zst", segment_name(1, *segment))),
            switched_segment(1, *segment),
        )
        .unwrap();
    }
    crate::common::write_config(
        root,
        &format!(
            "{}[[job]]\nname = \"db\"\nkind = \"postgres\"\nmode = \"physical\"\ndsn = \"postgresql://postgres@127.0.0.1:9/postgres\"\n",
            local_repository("repo", &root.join("repo"))
        ),
    )
}

/// What a hostile or broken repository holds must never read as whole: a backup short of
/// the WAL it needs to become consistent, a history file that expands without end, a
/// repository without its marker.
#[test]
fn a_broken_archive_is_never_proven_whole() {
    let work = tempfile::tempdir().unwrap();
    // The backup needs segments 2 to 4; 4 never arrived.
    let config = hand_made(work.path(), (2, 4), &[2, 3]);
    let run = lifeboat(&config, &["verify", "--archive"]);
    run.assert_code(1);
    run.assert_stdout_has(format!(
        "GAP      WAL segment {} is missing: point-in-time recovery from its oldest backup on (until a new base backup) is impossible in repository 'repo'; backup(s) 20260101T000000Z do not restore from it at all",
        segment_name(1, 4)
    ));
    run.assert_stdout_has("nothing restorable");
    lifeboat(&config, &["status"]).assert_code(2);

    // A history file that decodes to 64 MiB: refused within its limit, named, no abort.
    std::fs::write(
        work.path()
            .join("repo/jobs/db/wal/00000001/")
            .join(format!("{}.zst", segment_name(1, 4))),
        switched_segment(1, 4),
    )
    .unwrap();
    let history = work.path().join("repo/jobs/db/wal/00000002");
    std::fs::create_dir_all(&history).unwrap();
    std::fs::write(
        history.join("00000002.history.zst"),
        zstd::encode_all(&vec![b'1'; 64 << 20][..], 19).unwrap(),
    )
    .unwrap();
    std::fs::write(
        history.join(format!("{}.zst", segment_name(2, 5))),
        switched_segment(2, 5),
    )
    .unwrap();
    let status = lifeboat(&config, &["status"]);
    status.assert_code(2);
    status.assert_stdout_has("timeline history file 00000002.history does not read (");
    status.assert_stdout_has("decodes to more than 1048576 bytes");
    let run = lifeboat(&config, &["verify", "--archive"]);
    run.assert_code(1);
    run.assert_stdout_has(
        "DAMAGED  jobs/db/wal/00000002/00000002.history.zst: it decodes to more than 1048576 bytes",
    );
    run.assert_stdout_has("GAP      timeline history file 00000002.history is missing");
    std::fs::remove_dir_all(&history).unwrap();
    lifeboat(&config, &["verify", "--archive"]).assert_code(0);

    // Wiped: no marker, and nothing written into it.
    std::fs::remove_dir_all(work.path().join("repo")).unwrap();
    std::fs::create_dir(work.path().join("repo")).unwrap();
    let run = lifeboat(&config, &["verify", "--archive"]);
    run.assert_code(1);
    run.assert_stdout_has("NOT WHOLE repository 'repo' holds no marker (lifeboat.json)");
    assert_eq!(
        std::fs::read_dir(work.path().join("repo")).unwrap().count(),
        0
    );
}
