//! Hosts whose clocks are wrong, run under faketime against repositories that keep the real
//! time: a host an hour behind is refused with both times, and with the limit raised its
//! backups still sort as they happened; a host two hours fast is CRITICAL in `status`; a
//! backup dated in the future is named wherever it shows.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::common::{
    Run, Scenario, SeaweedFs, files_job, lifeboat, lifeboat_command, local_repository, run_command,
    write_config,
};

/// `lifeboat ARGS` on a host whose clock is `offset` (libfaketime's "-1h", "+2h") off.
fn on_host(offset: &str, config: &Path, args: &[&str]) -> Run {
    assert!(
        Path::new("/usr/bin/faketime").exists(),
        "faketime is not installed (.ci/setup installs the Debian package)"
    );
    let plain = lifeboat_command(config);
    let mut command = Command::new("/usr/bin/faketime");
    command
        .envs(plain.get_envs().filter_map(|(k, v)| Some((k, v?))))
        .env_remove("LIFEBOAT_CONFIG")
        .env_remove("LIFEBOAT_IDENTITY_FILE")
        // Timers and timeouts keep running at the real pace; only the wall clock is off.
        .env("FAKETIME_DONT_FAKE_MONOTONIC", "1")
        .arg("-f")
        .arg(offset)
        .arg(plain.get_program())
        .args(plain.get_args())
        .args(args);
    run_command(&mut command)
}

/// The id a `backup` run printed: "backup JOB/ID done: …".
fn backup_id(run: &Run) -> String {
    run.assert_code(0);
    let line = run
        .stdout
        .lines()
        .find(|l| l.starts_with("backup "))
        .unwrap_or_else(|| panic!("no backup line in {}", run.stdout));
    line.split('/')
        .nth(1)
        .unwrap()
        .split(' ')
        .next()
        .unwrap()
        .to_string()
}

fn restored_data(config: &Path, work: &Path, source: &Path) -> String {
    let into = work.join(format!("restore-{}", rand_suffix()));
    lifeboat(
        config,
        &["restore", "conf", "--into", into.to_str().unwrap()],
    )
    .assert_code(0);
    std::fs::read_to_string(into.join(source.strip_prefix("/").unwrap()).join("data")).unwrap()
}

fn rand_suffix() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_an_hour_behind_is_refused_and_with_the_limit_raised_its_backups_sort_as_made() {
    let server = SeaweedFs::start().await;
    server.create_bucket("backups").await;
    let work = tempfile::tempdir().unwrap();
    let source = work.path().join("app");
    std::fs::create_dir(&source).unwrap();
    let jobs = format!(
        "{}retention = {{ keep_last = 2 }}\n",
        files_job("conf", &[&source])
    );
    let repository = server.repository("s3", "backups", "shared");
    let host_a = write_config(work.path(), &format!("{repository}{jobs}"));
    let b_dir = work.path().join("host-b");
    std::fs::create_dir(&b_dir).unwrap();
    let host_b_strict = write_config(&b_dir, &format!("{repository}{jobs}"));
    let raised_dir = work.path().join("host-b-raised");
    std::fs::create_dir(&raised_dir).unwrap();
    let host_b = write_config(
        &raised_dir,
        &format!("max_clock_skew = \"3h\"\n{repository}{jobs}"),
    );
    let write = |data: &str| std::fs::write(source.join("data"), data).unwrap();

    write("A1");
    backup_id(&lifeboat(&host_a, &["backup", "conf"]));

    // An hour behind: refused before anything is written, naming both clocks.
    write("B refused");
    let refused = on_host("-1h", &host_b_strict, &["backup", "conf"]);
    refused.assert_code(1);
    assert!(
        refused
            .stderr
            .contains("this host's clock is 1h behind repository 's3' (host ")
            && refused.stderr.contains("more than max_clock_skew (2m)")
            && refused.stderr.contains("timedatectl"),
        "{}",
        refused.stderr
    );
    let listed = lifeboat(&host_a, &["list", "conf"]);
    assert_eq!(
        listed.stdout.matches("conf ").count(),
        1,
        "{}",
        listed.stdout
    );
    let check = on_host("-1h", &host_b_strict, &["check"]);
    check.assert_code(1);
    assert!(
        check.stdout.contains("FAILED   repository 's3'")
            && check.stdout.contains("1h behind repository 's3'"),
        "{}",
        check.stdout
    );
    let prune = on_host("-1h", &host_b_strict, &["prune"]);
    prune.assert_code(1);
    prune.assert_stderr_has("unable to prune");

    // With the limit raised, B takes its times from the repository: backups alternate with
    // A's and sort as they were made.
    let mut made = Vec::new();
    for (host, data) in [("B", "B2"), ("A", "A3"), ("B", "B3")] {
        std::thread::sleep(Duration::from_secs(2));
        write(data);
        let run = match host {
            "A" => lifeboat(&host_a, &["backup", "conf"]),
            _ => on_host("-1h", &host_b, &["backup", "conf"]),
        };
        made.push(backup_id(&run));
    }
    let mut sorted = made.clone();
    sorted.sort();
    assert_eq!(made, sorted, "ids in the order the backups were made");
    assert_eq!(restored_data(&host_a, work.path(), &source), "B3");

    // Prune from the host that is behind keeps the two newest: A3 and B3.
    on_host("-1h", &host_b, &["prune"]).assert_code(0);
    let listed = lifeboat(&host_a, &["list", "conf"]);
    let ids: Vec<&str> = listed
        .stdout
        .lines()
        .filter(|l| l.starts_with("conf "))
        .map(|l| l.split_whitespace().nth(1).unwrap())
        .collect();
    assert_eq!(
        ids,
        [made[2].as_str(), made[1].as_str()],
        "{}",
        listed.stdout
    );
    assert_eq!(restored_data(&host_a, work.path(), &source), "B3");
}

/// A files job over `WORK/app` (one file, `data`) into the local repository `WORK/repo`:
/// the source, the repository and the config.
fn one_local_repository(work: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let source = work.join("app");
    std::fs::create_dir(&source).unwrap();
    std::fs::write(source.join("data"), "now").unwrap();
    let repo = work.join("repo");
    let config = Scenario::new(work)
        .local("local", &repo)
        .files_job("conf", &[&source])
        .write();
    (source, repo, config)
}

/// A backup left a minute ahead by a repository whose clock ran fast within the limit: the
/// next backup, newer, still sorts after it; one dated beyond the limit is not followed.
#[test]
fn a_new_backup_never_sorts_before_one_already_there_within_the_limit() {
    let work = tempfile::tempdir().unwrap();
    let (_, repo, config) = one_local_repository(work.path());
    backup_id(&lifeboat(&config, &["backup", "conf"]));
    let ahead = lifeboat::layout::backup_id(chrono::Utc::now() + chrono::Duration::seconds(60));
    let far = lifeboat::layout::backup_id(chrono::Utc::now() + chrono::Duration::hours(3));
    for id in [&ahead, &far] {
        let dir = repo.join(lifeboat::layout::backup_prefix("conf", id));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("files.tar.zst"), b"left by another host").unwrap();
    }
    let next = backup_id(&lifeboat(&config, &["backup", "conf"]));
    assert!(
        next > ahead && next < far,
        "{next} is not between {ahead} and {far}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_two_hours_fast_is_critical_and_a_backup_dated_in_the_future_is_named() {
    let work = tempfile::tempdir().unwrap();
    let (source, repo, config) = one_local_repository(work.path());
    let id = backup_id(&lifeboat(&config, &["backup", "conf"]));

    let fast = on_host("+2h", &config, &["status", "conf"]);
    fast.assert_code(2);
    assert!(
        fast.stdout
            .contains("CRITICAL clock: this host's clock is 2h ahead of repository 'local'"),
        "{}",
        fast.stdout
    );
    // On a host with the right time the same repository is not CRITICAL.
    let fine = lifeboat(&config, &["status", "conf"]);
    assert_ne!(fine.code, 2, "{}", fine.stdout);

    // A backup an earlier lifeboat made on a host running three hours fast.
    let manifest_bytes =
        std::fs::read(repo.join(lifeboat::layout::manifest_key("conf", &id))).unwrap();
    let mut manifest = lifeboat::manifest::Manifest::from_json(&manifest_bytes).unwrap();
    let ahead = chrono::Utc::now() + chrono::Duration::hours(3);
    manifest.id = lifeboat::layout::backup_id(ahead);
    manifest.started_at = ahead;
    manifest.finished_at = ahead;
    manifest.recovery_point = ahead;
    for object in &manifest.objects {
        let to = repo.join(lifeboat::layout::object_key(
            "conf",
            &manifest.id,
            &object.name,
        ));
        std::fs::create_dir_all(to.parent().unwrap()).unwrap();
        std::fs::copy(
            repo.join(lifeboat::layout::object_key("conf", &id, &object.name)),
            to,
        )
        .unwrap();
    }
    std::fs::write(
        repo.join(lifeboat::layout::manifest_key("conf", &manifest.id)),
        manifest.to_json(),
    )
    .unwrap();

    let status = lifeboat(&config, &["status", "conf"]);
    status.assert_code(2);
    status.assert_stdout_has(format!(
        "newest backup {} is dated in the future",
        manifest.id
    ));
    let listed = lifeboat(&config, &["list", "conf"]);
    listed.assert_stdout_has(format!(
        "warning: backup {} of job 'conf' is dated after now",
        manifest.id
    ));
    let shown = lifeboat(&config, &["show", &manifest.id]);
    shown.assert_stdout_has("dated in the future");

    // Retention counts it for no rule: the backups really made since are not pushed out.
    std::fs::write(
        &config,
        format!(
            "{}{}retention = {{ keep_last = 1 }}\n",
            local_repository("local", &repo),
            files_job("conf", &[&source])
        ),
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(1100));
    std::fs::write(source.join("data"), "newer").unwrap();
    let newer = backup_id(&lifeboat(&config, &["backup", "conf"]));
    let prune = lifeboat(&config, &["prune"]);
    prune.assert_code(0);
    prune.assert_stdout_has("dated in the future (now ");
    for kept in [&newer, &manifest.id] {
        assert!(
            repo.join(lifeboat::layout::manifest_key("conf", kept))
                .exists(),
            "{kept} was removed\n{}",
            prune.stdout
        );
    }
    assert!(
        !repo
            .join(lifeboat::layout::manifest_key("conf", &id))
            .exists()
    );
}
