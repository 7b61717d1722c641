//! Per-job run locks: two backups of one job started together never both run, the one that
//! finds the lock taken says who holds it, and a holder killed with SIGKILL leaves nothing
//! that blocks the next run.

use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use crate::common::redis::Redis;
use crate::common::{files_job, lifeboat, lifeboat_command, local_repository, write_config};

/// A files job over a 1 GiB allocated file: reading and hashing it keeps a backup busy for a
/// few seconds.
fn slow_job(work: &Path) -> PathBuf {
    let tree = work.join("data");
    std::fs::create_dir_all(&tree).unwrap();
    // Allocated, not sparse (a sparse file's holes are skipped, and back up in no time): its
    // unwritten 1 GiB is read as zeros, which takes the backup a while, yet costs the disk
    // no writes.
    let big = std::fs::File::create(tree.join("big.img")).unwrap();
    use std::os::fd::AsRawFd;
    // SAFETY: an open descriptor and a valid range.
    let status = unsafe { libc::fallocate(big.as_raw_fd(), 0, 0, 1024 * 1024 * 1024) };
    assert_eq!(status, 0, "fallocate: {}", std::io::Error::last_os_error());
    write_config(
        work,
        &format!(
            "lock_dir = \"{}\"\n{}{}",
            work.join("locks").display(),
            local_repository("local", &work.join("repo")),
            files_job("data", &[&tree])
        ),
    )
}

fn spawn_backup(config: &Path) -> Child {
    lifeboat_command(config)
        .args(["backup", "data"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn committed(work: &Path) -> usize {
    let backups = work.join("repo/jobs/data/backups");
    std::fs::read_dir(backups)
        .map(|dirs| {
            dirs.filter(|d| d.as_ref().unwrap().path().join("manifest.json").exists())
                .count()
        })
        .unwrap_or(0)
}

#[test]
fn two_backups_of_one_job_started_together_run_one_at_a_time() {
    let work = tempfile::tempdir().unwrap();
    let config = slow_job(work.path());
    let first = spawn_backup(&config);
    let second = spawn_backup(&config);
    let (first_pid, second_pid) = (first.id(), second.id());
    let outputs = [
        first.wait_with_output().unwrap(),
        second.wait_with_output().unwrap(),
    ];
    let codes: Vec<i32> = outputs.iter().map(|o| o.status.code().unwrap()).collect();
    let (winner, loser, winner_pid) = match codes.as_slice() {
        [0, 75] => (&outputs[0], &outputs[1], first_pid),
        [75, 0] => (&outputs[1], &outputs[0], second_pid),
        other => panic!(
            "expected one success and one exit 75, got {other:?}\n{}\n{}",
            String::from_utf8_lossy(&outputs[0].stderr),
            String::from_utf8_lossy(&outputs[1].stderr)
        ),
    };
    let message = String::from_utf8_lossy(&loser.stderr);
    assert!(
        message.contains("job 'data' is locked by another run")
            && message.contains(&format!("pid {winner_pid} on host"))
            && message.contains("`lifeboat backup`"),
        "{message}"
    );
    assert!(String::from_utf8_lossy(&winner.stdout).contains("data"));
    assert_eq!(committed(work.path()), 1, "exactly one backup ran");
}

#[test]
fn a_backup_killed_with_sigkill_does_not_block_the_next() {
    let work = tempfile::tempdir().unwrap();
    let config = slow_job(work.path());
    let mut running = spawn_backup(&config);
    let pid = running.id();
    // Killed once it holds the lock: its pid is in the lock file.
    let locks = work.path().join("locks");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let holds = std::fs::read_dir(&locks)
            .into_iter()
            .flatten()
            .filter_map(|entry| std::fs::read_to_string(entry.unwrap().path()).ok())
            .any(|text| text.contains(&format!("\"pid\":{pid},")));
        if holds {
            break;
        }
        assert!(Instant::now() < deadline, "the backup never took its lock");
        assert!(
            running.try_wait().unwrap().is_none(),
            "the backup ended early"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    running.kill().unwrap();
    running.wait().unwrap();

    let next = lifeboat(&config, &["backup", "data"]);
    next.assert_code(0);
    assert_eq!(committed(work.path()), 1);
    // And a prune of the job is not blocked either.
    lifeboat(&config, &["prune", "--dry-run"]).assert_code(0);
}

/// The slow job of `slow_job`, for a second "host": its own lock directory, and a lock
/// shared through Redis.
fn shared_lock_config(work: &Path, host: &str, redis: &Redis) -> PathBuf {
    let dir = work.join(host);
    std::fs::create_dir_all(&dir).unwrap();
    let password = work.join("redis.pass");
    crate::common::write_secret(&password, crate::common::redis::PASSWORD, 0o600);
    write_config(
        &dir,
        &format!(
            "lock_dir = \"{}\"\nlock = \"{}\"\nlock_password_file = \"{}\"\n{}{}",
            dir.join("locks").display(),
            redis.url(),
            password.display(),
            local_repository("local", &work.join("repo")),
            files_job("data", &[&work.join("data")])
        ),
    )
}

fn redis_holder(redis: &Redis) -> Option<String> {
    let mut connection = redis.connection().unwrap();
    redis::cmd("GET")
        .arg("lifeboat:lock:data")
        .query(&mut connection)
        .unwrap()
}

fn wait_for_redis_holder(redis: &Redis, pid: u32, running: &mut Child) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !redis_holder(redis).is_some_and(|h| h.contains(&format!("\"pid\":{pid},"))) {
        assert!(
            Instant::now() < deadline,
            "the backup never took the Redis lock"
        );
        assert!(
            running.try_wait().unwrap().is_none(),
            "the backup ended early"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn a_lock_in_redis_keeps_two_hosts_from_running_one_job_at_once() {
    let redis = Redis::start(&[]);
    let work = tempfile::tempdir().unwrap();
    slow_job(work.path());
    let host_a = shared_lock_config(work.path(), "a", &redis);
    let host_b = shared_lock_config(work.path(), "b", &redis);

    let mut first = spawn_backup(&host_a);
    let pid = first.id();
    wait_for_redis_holder(&redis, pid, &mut first);
    let second = lifeboat(&host_b, &["backup", "data"]);
    second.assert_code(75);
    assert!(
        second.stderr.contains("job 'data' is locked in Redis at")
            && second.stderr.contains(&format!("pid {pid} on host")),
        "{}",
        second.stderr
    );
    assert!(first.wait().unwrap().success());
    assert_eq!(redis_holder(&redis), None, "released when the run ended");
    lifeboat(&host_b, &["backup", "data"]).assert_code(0);

    // Killed while holding it: the key stays, but its holder is seen to be gone.
    let mut killed = spawn_backup(&host_a);
    let pid = killed.id();
    wait_for_redis_holder(&redis, pid, &mut killed);
    killed.kill().unwrap();
    killed.wait().unwrap();
    assert!(redis_holder(&redis).is_some());
    lifeboat(&host_b, &["backup", "data"]).assert_code(0);
    assert_eq!(redis_holder(&redis), None);
}
