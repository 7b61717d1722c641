//! A run stopped by SIGTERM (what `systemctl stop` sends) at any moment: backups to a local
//! and an S3 repository, and prunes. Each stopped run exits 143 with one log line saying what
//! it cleaned, leaves no temp file, no open multipart upload and no claim, and the next run
//! succeeds with every backup whole.

use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use crate::common::{
    Run, SeaweedFs, files_job, lifeboat, lifeboat_command, local_repository, tree,
};

/// Starts `lifeboat ARGS` and sends it SIGTERM after `delay`: how it ended.
fn stopped_after(config: &Path, args: &[&str], delay: Duration) -> Run {
    let child: Child = lifeboat_command(config)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(delay);
    // SAFETY: kill(2) on the lifeboat this test started.
    unsafe {
        libc::kill(child.id() as i32, libc::SIGTERM);
    }
    Run::from_output(child.wait_with_output().unwrap())
}

/// Temp files (`.NAME.lifeboat-tmp-*`) anywhere under `root`.
fn temp_files(root: &Path) -> Vec<String> {
    walkdir::WalkDir::new(root)
        .into_iter()
        .filter_map(Result::ok)
        .map(|e| e.path().display().to_string())
        .filter(|p| p.contains(".lifeboat-tmp-"))
        .collect()
}

/// A run stopped by SIGTERM: exit 143, and the interrupt's line is the last thing logged
/// and the only warning or error.
fn assert_stopped_cleanly(run: &Run, command: &str) {
    assert_eq!(run.code, 143, "{}\n{}", run.stdout, run.stderr);
    let lines: Vec<&str> = run.stderr.lines().collect();
    let last = lines.last().copied().unwrap_or_default();
    assert!(
        last.contains(&format!("{command} interrupted by SIGTERM")) && last.contains("exiting 143"),
        "{}",
        run.stderr
    );
    let loud = lines
        .iter()
        .filter(|l| l.contains(" WARN ") || l.contains(" ERROR ") || l.starts_with("error"))
        .count();
    assert_eq!(loud, 1, "{}", run.stderr);
}

/// No temp file in the local repository, no open upload and no claim in either.
async fn nothing_left(s3: &SeaweedFs, local: &Path, what: &str) {
    assert_eq!(temp_files(local), Vec::<String>::new(), "{what}");
    assert_eq!(
        s3.open_uploads("stop").await,
        Vec::<String>::new(),
        "{what}"
    );
    assert_eq!(
        s3.keys("stop", "lb/jobs/conf/claims/").await,
        Vec::<String>::new(),
        "{what}"
    );
    let claims = local.join("jobs/conf/claims");
    assert_eq!(
        std::fs::read_dir(&claims).map(|d| d.count()).unwrap_or(0),
        0,
        "{what}"
    );
}

/// Delays spread over `span`, the same on every run of the test (so a failure reproduces).
fn moments(count: usize, span: Duration) -> Vec<Duration> {
    let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
    (0..count)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            span.mul_f64(0.05 + 0.9 * (state % 1000) as f64 / 1000.0)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_during_backup_and_prune_leaves_nothing_behind() {
    let s3 = SeaweedFs::start().await;
    s3.create_bucket("stop").await;
    let work = tempfile::tempdir().unwrap();
    let source = work.path().join("src");
    tree::build(&source, 20, 0);
    // Several parts of 5 MiB each way: long enough to be stopped in the middle.
    tree::write_file(
        &source.join("big.bin"),
        &tree::noise(40 * 1024 * 1024, 7),
        0o640,
    );
    let local = work.path().join("local");
    let metrics = work.path().join("metrics");
    let config = crate::common::write_config(
        work.path(),
        &format!(
            "metrics_dir = \"{}\"\n{}{}{}retention = {{ keep_last = 1 }}\n",
            metrics.display(),
            local_repository("local", &local),
            s3.repository("s3", "stop", "lb"),
            files_job("conf", &[&source])
        ),
    );
    let started = Instant::now();
    lifeboat(&config, &["backup", "conf"]).assert_code(0);
    let backup_takes = started.elapsed();

    // Ten backups stopped mid-run; one that finished first (this machine is shared, run
    // times vary) is a backup like any other, and the next try comes sooner.
    let mut stopped = 0;
    let mut span = backup_takes;
    for (round, moment) in moments(30, Duration::from_secs(1)).into_iter().enumerate() {
        if stopped == 10 {
            break;
        }
        let delay = span.mul_f64(moment.as_secs_f64());
        let run = stopped_after(&config, &["backup", "conf"], delay);
        if run.code == 0 {
            span = span.mul_f64(0.8);
            continue;
        }
        stopped += 1;
        assert_stopped_cleanly(&run, "backup");
        // The run says how it ended, for the alert on failing backups: by SIGTERM.
        let recorded = std::fs::read_to_string(metrics.join("lifeboat-backup-conf.prom")).unwrap();
        assert!(
            recorded.contains("lifeboat_last_run_exit_code{command=\"backup\",job=\"conf\"} 143\n"),
            "round {round}: {recorded}"
        );
        nothing_left(
            &s3,
            &local,
            &format!("backup round {round}, stopped after {delay:?}"),
        )
        .await;
    }
    assert_eq!(
        stopped, 10,
        "only {stopped} backups were stopped in time in 30 tries"
    );
    lifeboat(&config, &["backup", "conf"]).assert_code(0);
    lifeboat(&config, &["verify", "conf"]).assert_code(0);

    // Prunes, each with backups to remove.
    for (round, delay) in moments(5, Duration::from_millis(400))
        .into_iter()
        .enumerate()
    {
        lifeboat(&config, &["backup", "conf"]).assert_code(0);
        let run = stopped_after(&config, &["prune", "conf", "--grace", "1s"], delay);
        if run.code != 0 {
            assert_stopped_cleanly(&run, "prune");
        }
        nothing_left(
            &s3,
            &local,
            &format!("prune round {round}, stopped after {delay:?}"),
        )
        .await;
        // What it left, the next prune finishes; every backup it kept is whole.
        lifeboat(&config, &["prune", "conf", "--grace", "1s"]).assert_code(0);
        lifeboat(&config, &["verify", "conf"]).assert_code(0);
    }
    let into = work.path().join("restored");
    lifeboat(
        &config,
        &["restore", "conf", "--into", into.to_str().unwrap()],
    )
    .assert_code(0);
    tree::assert_same(&source, &into.join(source.strip_prefix("/").unwrap()));
}

/// The config of a files job `conf` over the tree `fill` makes under `work/etc/app`, backed up
/// once into the local repository `work/repo`.
fn backed_up_conf(work: &Path, fill: impl FnOnce(&Path)) -> PathBuf {
    let source = work.join("etc/app");
    fill(&source);
    let config = crate::common::write_config(
        work,
        &format!(
            "{}{}",
            local_repository("local", &work.join("repo")),
            files_job("conf", &[&source])
        ),
    );
    lifeboat(&config, &["backup", "conf"]).assert_code(0);
    config
}

/// A files restore of many files stopped while it unpacks them leaves nothing behind: the
/// cleanup removes the staging tree only once no entry is being made, and none is made after.
#[test]
fn a_files_restore_stopped_while_it_unpacks_leaves_nothing_behind() {
    let work = tempfile::tempdir().unwrap();
    let config = backed_up_conf(work.path(), |source| tree::build(source, 20_000, 0));
    let mut stopped = 0;
    for (round, signal) in [libc::SIGTERM, libc::SIGINT, libc::SIGTERM, libc::SIGINT]
        .into_iter()
        .enumerate()
    {
        let into = work.path().join(format!("restored-{round}"));
        let mut child = lifeboat_command(&config)
            .args(["restore", "conf", "--into", into.to_str().unwrap()])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // Entries under the staging directory's tree: the unpacking has begun.
        let unpacking = || {
            let Ok(entries) = std::fs::read_dir(&into) else {
                return false;
            };
            entries.filter_map(Result::ok).any(|staging| {
                std::fs::read_dir(staging.path().join("tree"))
                    .is_ok_and(|mut tree| tree.next().is_some())
            })
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        while !unpacking() && Instant::now() < deadline && child.try_wait().unwrap().is_none() {
            std::thread::sleep(Duration::from_millis(1));
        }
        assert!(unpacking(), "the restore never unpacked");
        std::thread::sleep(Duration::from_millis(20 * round as u64));
        // SAFETY: kill(2) on the lifeboat this test started.
        unsafe {
            libc::kill(child.id() as i32, signal);
        }
        let run = Run::from_output(child.wait_with_output().unwrap());
        if run.code == 0 {
            // It ended before the signal came; nothing to judge.
            continue;
        }
        assert_eq!(run.code, 128 + signal, "{}", run.stderr);
        stopped += 1;
        assert!(
            !into.exists(),
            "a restore stopped by signal {signal} while it unpacked left {} entries",
            walkdir::WalkDir::new(&into).into_iter().count()
        );
    }
    assert!(
        stopped >= 2,
        "only {stopped} of 4 restores were stopped mid-way"
    );
}

/// A files restore stopped by SIGTERM or SIGINT while it stages leaves nothing behind: not
/// its staging, and not the directory it made for the restore.
#[test]
fn a_files_restore_stopped_while_it_stages_removes_the_directory_it_made() {
    let work = tempfile::tempdir().unwrap();
    let config = backed_up_conf(work.path(), |source| {
        tree::build(source, 10, 0);
        tree::write_file(&source.join("large.bin"), &tree::noise(64 << 20, 3), 0o640);
    });
    for signal in [libc::SIGTERM, libc::SIGINT] {
        let into = work.path().join(format!("restored-{signal}"));
        let mut child = lifeboat_command(&config)
            .args(["restore", "conf", "--into", into.to_str().unwrap()])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        let staging = || {
            std::fs::read_dir(&into).is_ok_and(|mut entries| {
                entries.any(|e| {
                    e.unwrap()
                        .file_name()
                        .to_string_lossy()
                        .starts_with(".lifeboat-restore-")
                })
            })
        };
        while !staging() && Instant::now() < deadline && child.try_wait().unwrap().is_none() {
            std::thread::sleep(Duration::from_millis(2));
        }
        assert!(staging(), "the restore never staged");
        // SAFETY: kill(2) on the lifeboat this test started.
        unsafe {
            libc::kill(child.id() as i32, signal);
        }
        let run = Run::from_output(child.wait_with_output().unwrap());
        assert_eq!(run.code, 128 + signal, "{}", run.stderr);
        assert!(
            !into.exists(),
            "a restore stopped by signal {signal} left {:?}",
            std::fs::read_dir(&into).map(|d| d.count())
        );
    }
}
