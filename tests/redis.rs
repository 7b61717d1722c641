//! Redis jobs against real redis-servers: every type, binary values and TTLs survive a
//! backup and a restore into a scratch server, in both payload forms SYNC can take; a
//! connection cut mid-payload and a wrong password commit nothing.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;

use crate::common::redis::{PASSWORD, Redis, snapshot};
use crate::common::{lifeboat, local_repository, write_config, write_secret};

const JOB: &str = "sessions";

fn redis_config(work: &Path, url: &str, password: &str) -> std::path::PathBuf {
    let password_file = work.join("redis.pass");
    write_secret(&password_file, password, 0o600);
    write_config(
        work,
        &format!(
            "{}[[job]]\nname = \"{JOB}\"\nkind = \"redis\"\nurl = \"{url}\"\npassword_file = \"{}\"\nheartbeat = true\n",
            local_repository("local", &work.join("repo")),
            password_file.display()
        ),
    )
}

/// Over 100k keys of every type: strings (some binary), hashes, lists, sets, sorted sets,
/// streams, and keys with TTLs.
fn populate(connection: &mut redis::Connection) {
    for chunk in 0..6 {
        let mut pipe = redis::pipe();
        for i in chunk * 10_000..(chunk + 1) * 10_000 {
            if i % 10 == 0 {
                let binary: Vec<u8> = vec![0, 255, (i % 256) as u8, b'\n', 0, 128];
                pipe.cmd("SET").arg(format!("bin:{i}")).arg(binary).ignore();
            } else {
                pipe.cmd("SET")
                    .arg(format!("s:{i}"))
                    .arg(format!("session-{i}-ünï"))
                    .ignore();
            }
        }
        let () = pipe.query(connection).unwrap();
    }
    let mut pipe = redis::pipe();
    for i in 0..10_000 {
        pipe.cmd("HSET")
            .arg(format!("h:{i}"))
            .arg("user")
            .arg(i)
            .arg("role")
            .arg("admin")
            .arg("seen")
            .arg(i * 7)
            .ignore();
        pipe.cmd("RPUSH")
            .arg(format!("l:{i}"))
            .arg("a")
            .arg(i)
            .arg("c")
            .arg("a")
            .ignore();
        pipe.cmd("SADD")
            .arg(format!("set:{i}"))
            .arg("x")
            .arg(i)
            .arg("z")
            .ignore();
        pipe.cmd("ZADD")
            .arg(format!("z:{i}"))
            .arg(1.5)
            .arg("one")
            .arg(i)
            .arg("two")
            .arg(-3)
            .arg("three")
            .ignore();
    }
    let () = pipe.query(connection).unwrap();
    let mut pipe = redis::pipe();
    for i in 0..1_000 {
        for entry in 1..=3 {
            pipe.cmd("XADD")
                .arg(format!("x:{i}"))
                .arg(format!("{}-{entry}", 1_700_000_000_000u64 + i))
                .arg("event")
                .arg(format!("login {entry}"))
                .ignore();
        }
    }
    for i in 0..5_000 {
        pipe.cmd("SET")
            .arg(format!("t:{i}"))
            .arg(i)
            .arg("PX")
            .arg(3_600_000 + i * 1_000)
            .ignore();
    }
    let () = pipe.query(connection).unwrap();
    let keys: u64 = redis::cmd("DBSIZE").query(connection).unwrap();
    assert!(keys >= 100_000, "{keys} keys");
}

/// Stops the scratch redis-server a restore left running, even when an assertion fails.
struct Scratch {
    pid: i32,
    dir: String,
}

impl Drop for Scratch {
    fn drop(&mut self) {
        unsafe { libc::kill(self.pid, libc::SIGTERM) };
        for _ in 0..200 {
            if unsafe { libc::kill(self.pid, 0) } != 0 {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// "… redis-server pid PID serving the restored data at 127.0.0.1:PORT; stop it with `kill PID` and remove DIR, …"
fn scratch_from(stdout: &str) -> (Scratch, u16) {
    let after = stdout.split("redis-server pid ").nth(1).expect(stdout);
    let pid: i32 = after.split_whitespace().next().unwrap().parse().unwrap();
    let address = after.split(" at 127.0.0.1:").nth(1).unwrap();
    let port: u16 = address.split(';').next().unwrap().parse().unwrap();
    let dir = after
        .split(" and remove ")
        .nth(1)
        .unwrap()
        .split(',')
        .next()
        .unwrap()
        .to_string();
    (Scratch { pid, dir }, port)
}

/// `restore --start-scratch`, and a connection to the server it left running.
fn restore_into_scratch(config: &Path) -> (Scratch, redis::Connection) {
    let restore = lifeboat(config, &["restore", JOB, "--start-scratch"]);
    restore.assert_code(0);
    let (scratch, port) = scratch_from(&restore.stdout);
    // Without its password the server serves nothing.
    let mut stranger = redis::Client::open(format!("redis://127.0.0.1:{port}/"))
        .unwrap()
        .get_connection()
        .unwrap();
    let refused: redis::RedisResult<i64> = redis::cmd("DBSIZE").query(&mut stranger);
    assert!(
        refused.is_err(),
        "the scratch server answered without its password"
    );
    let password = std::fs::read_to_string(Path::new(&scratch.dir).join("password")).unwrap();
    let mode = std::fs::metadata(Path::new(&scratch.dir).join("password"))
        .unwrap()
        .permissions();
    assert_eq!(std::os::unix::fs::PermissionsExt::mode(&mode) & 0o077, 0);
    let connection = redis::Client::open(format!("redis://:{}@127.0.0.1:{port}/", password.trim()))
        .unwrap()
        .get_connection()
        .unwrap();
    (scratch, connection)
}

fn round_trip(diskless: &str, form: &str) {
    let source = Redis::start(&[
        "--repl-diskless-sync",
        diskless,
        "--repl-diskless-sync-delay",
        "0",
    ]);
    let mut connection = source.connection().unwrap();
    populate(&mut connection);
    let work = tempfile::tempdir().unwrap();
    let config = redis_config(work.path(), &source.url(), PASSWORD);

    let backup = lifeboat(&config, &["backup", JOB]);
    backup.assert_code(0);
    assert!(
        backup.stderr.contains(&format!("form={form}")),
        "the {form} payload form: {}",
        backup.stderr
    );
    let expected = snapshot(&mut connection);
    let show = lifeboat(
        &config,
        &["show", "latest", "--job", JOB, "--format", "json"],
    );
    let manifest: serde_json::Value = serde_json::from_str(&show.stdout).unwrap();
    assert_eq!(manifest["kind"], "redis");
    assert_eq!(manifest["source"]["keys"], expected.len() as u64);
    assert!(
        manifest["source"]["server_version"]
            .as_str()
            .unwrap()
            .starts_with('7')
    );
    let shown = lifeboat(&config, &["show", "latest", "--job", JOB]);
    shown.assert_stdout_has("server          Redis 7");

    let (_scratch, mut restored) = restore_into_scratch(&config);
    let actual = snapshot(&mut restored);
    assert_eq!(actual.len(), expected.len());
    for (got, want) in actual.iter().zip(&expected) {
        assert_eq!(got, want, "key {:?}", String::from_utf8_lossy(&want.0));
    }
    let with_ttl = actual.iter().filter(|k| k.3 > 0).count();
    assert_eq!(with_ttl, 5_000, "every TTL survives, to the millisecond");

    // The RDB as a file for an operator, never over an existing one.
    let rdb = work.path().join("restored.rdb");
    lifeboat(&config, &["restore", JOB, "--into", rdb.to_str().unwrap()]).assert_code(0);
    assert!(std::fs::read(&rdb).unwrap().starts_with(b"REDIS"));
    let again = lifeboat(&config, &["restore", JOB, "--into", rdb.to_str().unwrap()]);
    again.assert_code(1);
    again.assert_stderr_has("it exists");

    // Restored by root into redis's directory, the file is the server's to load: owned and
    // moded as the dump.rdb there, else owned as the directory and private.
    if crate::common::is_root() {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        const NOBODY: u32 = 65_534;
        let served = work.path().join("served");
        std::fs::create_dir(&served).unwrap();
        std::os::unix::fs::chown(&served, Some(NOBODY), Some(NOBODY)).unwrap();
        let into = served.join("from-backup.rdb");
        lifeboat(&config, &["restore", JOB, "--into", into.to_str().unwrap()]).assert_code(0);
        let meta = std::fs::metadata(&into).unwrap();
        assert_eq!(
            (meta.uid(), meta.gid(), meta.mode() & 0o777),
            (NOBODY, NOBODY, 0o600)
        );
        let dump = served.join("dump.rdb");
        std::fs::write(&dump, b"REDIS").unwrap();
        std::os::unix::fs::chown(&dump, Some(NOBODY), Some(0)).unwrap();
        std::fs::set_permissions(&dump, std::fs::Permissions::from_mode(0o640)).unwrap();
        let into = served.join("again.rdb");
        lifeboat(&config, &["restore", JOB, "--into", into.to_str().unwrap()]).assert_code(0);
        let meta = std::fs::metadata(&into).unwrap();
        assert_eq!(
            (meta.uid(), meta.gid(), meta.mode() & 0o777),
            (NOBODY, 0, 0o640)
        );
    }
}

#[test]
fn every_key_type_value_and_ttl_survives_a_disk_based_sync() {
    round_trip("no", "Sized");
}

#[test]
fn every_key_type_value_and_ttl_survives_a_diskless_sync() {
    round_trip("yes", "Delimited");
}

/// A proxy to `port` that passes each connection only `limit` bytes from the server, then
/// closes both sides: commands with short replies go through, a payload is cut.
fn cutting_proxy(port: u16, limit: usize) -> u16 {
    let listener = TcpListener::bind(("127.0.0.1", 0)).unwrap();
    let proxy_port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for client in listener.incoming() {
            let Ok(mut client) = client else { return };
            std::thread::spawn(move || {
                let mut server = TcpStream::connect(("127.0.0.1", port)).unwrap();
                let mut to_server = server.try_clone().unwrap();
                let mut from_client = client.try_clone().unwrap();
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut from_client, &mut to_server);
                });
                let mut passed = 0;
                let mut buf = [0u8; 8192];
                while passed < limit {
                    let n = match server.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => n.min(limit - passed),
                    };
                    if client.write_all(&buf[..n]).is_err() {
                        break;
                    }
                    passed += n;
                }
                let _ = client.shutdown(std::net::Shutdown::Both);
                let _ = server.shutdown(std::net::Shutdown::Both);
            });
        }
    });
    proxy_port
}

#[test]
fn a_connection_cut_mid_payload_or_a_wrong_password_commits_nothing() {
    let source = Redis::start(&["--repl-diskless-sync", "no"]);
    let mut connection = source.connection().unwrap();
    populate(&mut connection);
    let work = tempfile::tempdir().unwrap();

    let proxy = cutting_proxy(source.port, 512 * 1024);
    let config = redis_config(work.path(), &format!("redis://127.0.0.1:{proxy}"), PASSWORD);
    let run = lifeboat(&config, &["backup", JOB]);
    run.assert_code(1);
    assert!(
        run.stderr.contains("bytes of the payload"),
        "the error says where the payload stopped: {}",
        run.stderr
    );
    let manifests = walkdir::WalkDir::new(work.path().join("repo"))
        .into_iter()
        .filter_map(Result::ok)
        .filter(|e| e.file_name() == "manifest.json")
        .count();
    assert_eq!(manifests, 0, "no manifest for a cut payload");

    let wrong = tempfile::tempdir().unwrap();
    let config = redis_config(wrong.path(), &source.url(), "not-the-password");
    let run = lifeboat(&config, &["backup", JOB]);
    run.assert_code(1);
    assert!(
        run.stderr
            .contains("unable to authenticate (wrong username or password) on Redis at")
            && run
                .stderr
                .contains("hint: check username and password_file"),
        "{}",
        run.stderr
    );
}

#[test]
fn where_sync_is_refused_the_rdb_file_after_bgsave_is_the_fallback() {
    let source = Redis::start(&[]);
    let mut connection = source.connection().unwrap();
    populate(&mut connection);
    user_without_sync(&mut connection, "backup", false);
    let work = tempfile::tempdir().unwrap();
    let password_file = work.path().join("redis.pass");
    write_secret(&password_file, "backup-pw", 0o600);
    let job = |rdb_path: &str| {
        format!(
            "{}[[job]]\nname = \"{JOB}\"\nkind = \"redis\"\nurl = \"{}\"\nusername = \"backup\"\npassword_file = \"{}\"\n{rdb_path}\n",
            local_repository("local", &work.path().join("repo")),
            source.url(),
            password_file.display()
        )
    };

    // Without rdb_path the refusal is named, with what to do.
    let config = write_config(work.path(), &job(""));
    let refused = lifeboat(&config, &["backup", JOB]);
    refused.assert_code(1);
    assert!(
        refused.stderr.contains("SYNC was refused") && refused.stderr.contains("set rdb_path"),
        "{}",
        refused.stderr
    );

    let config = write_config(
        work.path(),
        &job(&format!(
            "rdb_path = \"{}\"",
            source.dir.path().join("dump.rdb").display()
        )),
    );
    let fallback = lifeboat(&config, &["backup", JOB]);
    fallback.assert_code(0);
    fallback.assert_stderr_has("falling back to BGSAVE");
    let expected = snapshot(&mut connection);
    let (_scratch, mut restored) = restore_into_scratch(&config);
    assert_eq!(snapshot(&mut restored), expected);
}

/// A user that may do everything but replicate, like a managed service's; with `no_config`,
/// not CONFIG either.
fn user_without_sync(connection: &mut redis::Connection, name: &str, no_config: bool) {
    let mut command = redis::cmd("ACL");
    command
        .arg("SETUSER")
        .arg(name)
        .arg("on")
        .arg(">backup-pw")
        .arg("~*")
        .arg("&*")
        .arg("+@all")
        .arg("-sync")
        .arg("-psync");
    if no_config {
        command.arg("-config");
    }
    let () = command.query(connection).unwrap();
}

/// With `rdb_path`, the file backed up must be the one the server just saved: a stale file
/// at another path is refused, naming both paths where CONFIG tells the server's, and both
/// times where it does not; nothing is committed either way.
#[test]
fn a_stale_rdb_file_at_a_wrong_path_is_refused_with_both_paths_or_times() {
    let source = Redis::start(&[]);
    let mut connection = source.connection().unwrap();
    let () = redis::cmd("SET")
        .arg("k")
        .arg("v")
        .query(&mut connection)
        .unwrap();
    user_without_sync(&mut connection, "backup", false);
    user_without_sync(&mut connection, "blind", true);
    let work = tempfile::tempdir().unwrap();
    let password_file = work.path().join("redis.pass");
    write_secret(&password_file, "backup-pw", 0o600);
    // Yesterday's dump, at a path the server does not save to.
    let stale = work.path().join("old/dump.rdb");
    std::fs::create_dir_all(stale.parent().unwrap()).unwrap();
    let () = redis::cmd("SAVE").query(&mut connection).unwrap();
    std::fs::copy(source.dir.path().join("dump.rdb"), &stale).unwrap();
    let two_days_ago = std::time::SystemTime::now() - std::time::Duration::from_secs(2 * 86_400);
    std::fs::File::options()
        .write(true)
        .open(&stale)
        .unwrap()
        .set_modified(two_days_ago)
        .unwrap();
    // A hard link to the server's last dump: its path is another, its inode the server's
    // until the next save replaces the file.
    let linked = work.path().join("linked.rdb");
    std::fs::hard_link(source.dir.path().join("dump.rdb"), &linked).unwrap();
    // The stale dump touched to look fresh: the save time it records tells.
    let touched = work.path().join("touched.rdb");
    std::fs::copy(&stale, &touched).unwrap();
    let fifo = work.path().join("fifo.rdb");
    let c_fifo = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: a valid C string.
    assert_eq!(unsafe { libc::mkfifo(c_fifo.as_ptr(), 0o600) }, 0);
    std::thread::sleep(std::time::Duration::from_millis(1_100));
    let config_for = |user: &str, rdb_path: &Path| {
        write_config(
            work.path(),
            &format!(
                "{}[[job]]\nname = \"{JOB}\"\nkind = \"redis\"\nurl = \"{}\"\nusername = \"{user}\"\npassword_file = \"{}\"\nrdb_path = \"{}\"\n",
                local_repository("local", &work.path().join("repo")),
                source.url(),
                password_file.display(),
                rdb_path.display()
            ),
        )
    };
    for (user, rdb_path, expected) in [
        (
            "backup",
            &stale,
            vec![
                format!("rdb_path '{}' is not the file", stale.display()),
                format!("say '{}'", source.dir.path().join("dump.rdb").display()),
            ],
        ),
        (
            "backup",
            &linked,
            vec![format!("rdb_path '{}' is not the file", linked.display())],
        ),
        (
            "backup",
            &fifo,
            vec![format!(
                "rdb_path '{}' is not a regular file",
                fifo.display()
            )],
        ),
        (
            "blind",
            &stale,
            vec![
                format!("the RDB file '{}' was last written at", stale.display()),
                "before the BGSAVE lifeboat asked for at".to_string(),
                "LASTSAVE".to_string(),
            ],
        ),
        (
            "blind",
            &touched,
            vec![format!(
                "the RDB file '{}' says (its ctime field) it was saved at",
                touched.display()
            )],
        ),
    ] {
        if rdb_path == &touched {
            std::fs::File::options()
                .write(true)
                .open(&touched)
                .unwrap()
                .set_modified(std::time::SystemTime::now() + std::time::Duration::from_secs(5))
                .unwrap();
        }
        let config = config_for(user, rdb_path);
        let run = lifeboat(&config, &["backup", JOB]);
        run.assert_code(1);
        for text in &expected {
            assert!(run.stderr.contains(text), "{user}: {text}: {}", run.stderr);
        }
        let list = lifeboat(&config, &["list", JOB, "--format", "json"]);
        assert!(!list.stdout.contains("\"id\""), "{}", list.stdout);
    }

    // A save already running (here a slow one) is waited for, then lifeboat's own is made.
    let () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("rdb-key-save-delay")
        .arg("200000")
        .query(&mut connection)
        .unwrap();
    for n in 0..10 {
        let () = redis::cmd("SET")
            .arg(format!("slow{n}"))
            .arg("v")
            .query(&mut connection)
            .unwrap();
    }
    let _: redis::Value = redis::cmd("BGSAVE").query(&mut connection).unwrap();
    let config = config_for("backup", &source.dir.path().join("dump.rdb"));
    let run = lifeboat(&config, &["backup", JOB]);
    run.assert_code(0);
    let (_scratch, mut restored) = restore_into_scratch(&config);
    let keys: i64 = redis::cmd("DBSIZE").query(&mut restored).unwrap();
    assert_eq!(keys, 11);
}

/// INFO replication's `master_link_status` of the server at `port`.
fn link_status(connection: &mut redis::Connection) -> String {
    let info: String = redis::cmd("INFO")
        .arg("replication")
        .query(connection)
        .unwrap();
    info.lines()
        .find_map(|l| l.strip_prefix("master_link_status:"))
        .unwrap_or_default()
        .trim()
        .to_string()
}

/// A replica is backed up while its link is up, with the recovery point of its primary's
/// last contact and the heartbeat written to the primary (`primary_url`); without
/// `primary_url` the heartbeat is skipped with a note. Cut off from its primary, it is
/// refused, naming the staleness, with no hint to read its file instead.
#[test]
fn a_replica_is_backed_up_only_while_its_primary_is_in_touch() {
    // Pings far apart, so the replica's last contact ages while nothing is written.
    let mut primary = Redis::start(&["--repl-ping-replica-period", "60"]);
    let replica = Redis::start(&[
        "--replicaof",
        "127.0.0.1",
        &primary.port.to_string(),
        "--masterauth",
        PASSWORD,
    ]);
    let mut on_primary = primary.connection().unwrap();
    let () = redis::cmd("SET")
        .arg("k")
        .arg("v")
        .query(&mut on_primary)
        .unwrap();
    let mut on_replica = replica.connection().unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while link_status(&mut on_replica) != "up" {
        assert!(
            std::time::Instant::now() < deadline,
            "the replica never linked"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    std::thread::sleep(std::time::Duration::from_secs(3));
    let work = tempfile::tempdir().unwrap();
    let password_file = work.path().join("redis.pass");
    write_secret(&password_file, PASSWORD, 0o600);
    let config = |primary_url: &str| {
        write_config(
            work.path(),
            &format!(
                "{}[[job]]\nname = \"{JOB}\"\nkind = \"redis\"\nurl = \"{}\"\npassword_file = \"{}\"\nheartbeat = true\n{primary_url}\n",
                local_repository("local", &work.path().join("repo")),
                replica.url(),
                password_file.display()
            ),
        )
    };
    let with_primary = config(&format!("primary_url = \"{}\"", primary.url()));
    let run = lifeboat(&with_primary, &["backup", JOB]);
    run.assert_code(0);
    assert!(
        run.stdout
            .contains("the recovery point is its primary's last contact"),
        "{}",
        run.stdout
    );
    let show = lifeboat(
        &with_primary,
        &["show", "latest", "--job", JOB, "--format", "json"],
    );
    let manifest: serde_json::Value = serde_json::from_str(&show.stdout).unwrap();
    let time = |field: &str| {
        chrono::DateTime::parse_from_rfc3339(manifest[field].as_str().unwrap()).unwrap()
    };
    let behind = time("started_at") - time("recovery_point");
    assert!(
        behind >= chrono::Duration::seconds(2) && behind < chrono::Duration::seconds(30),
        "{behind}: {manifest}"
    );
    // The heartbeat went to the primary, and the backup of the replica holds it.
    let beat: Option<String> = redis::cmd("GET")
        .arg(format!("lifeboat:heartbeat:{JOB}"))
        .query(&mut on_primary)
        .unwrap();
    assert!(beat.is_some());
    let (_scratch, mut restored) = restore_into_scratch(&with_primary);
    let restored_beat: Option<String> = redis::cmd("GET")
        .arg(format!("lifeboat:heartbeat:{JOB}"))
        .query(&mut restored)
        .unwrap();
    assert_eq!(restored_beat, beat);

    // A primary_url that is not what the replica follows would take the heartbeat
    // elsewhere: refused, naming both.
    let stranger = Redis::start(&[]);
    let elsewhere = config(&format!("primary_url = \"{}\"", stranger.url()));
    let run = lifeboat(&elsewhere, &["backup", JOB]);
    run.assert_code(1);
    assert!(
        run.stderr.contains("which is not the primary")
            && run.stderr.contains("replication ids differ"),
        "{}",
        run.stderr
    );
    let beat: Option<String> = redis::cmd("GET")
        .arg(format!("lifeboat:heartbeat:{JOB}"))
        .query(&mut stranger.connection().unwrap())
        .unwrap();
    assert_eq!(beat, None);

    let without_primary = config("");
    let run = lifeboat(&without_primary, &["backup", JOB]);
    run.assert_code(0);
    assert!(
        run.stdout.contains("no heartbeat written") && run.stdout.contains("set primary_url"),
        "{}",
        run.stdout
    );

    primary.stop();
    while link_status(&mut on_replica) != "down" {
        assert!(
            std::time::Instant::now() < deadline,
            "the replica never noticed"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let run = lifeboat(&without_primary, &["backup", JOB]);
    run.assert_code(1);
    assert!(
        run.stderr
            .contains("is a replica whose link to its primary")
            && run.stderr.contains("its data may be stale")
            && !run.stderr.contains("rdb_path"),
        "{}",
        run.stderr
    );
}

/// A save the server cannot make (here its directory is gone, as when a disk fails or fork
/// finds no memory) ends SYNC with a closed connection; the error then gives the server's
/// own status, not only the closed connection.
#[test]
fn a_save_the_server_cannot_make_is_reported_with_its_reason() {
    let source = Redis::start(&["--repl-diskless-sync", "no"]);
    let mut connection = source.connection().unwrap();
    let () = redis::cmd("SET")
        .arg("k")
        .arg("v")
        .query(&mut connection)
        .unwrap();
    std::fs::remove_dir_all(source.dir.path()).unwrap();
    let work = tempfile::tempdir().unwrap();
    let config = redis_config(work.path(), &source.url(), PASSWORD);
    let run = lifeboat(&config, &["backup", JOB]);
    run.assert_code(1);
    assert!(
        run.stderr.contains("rdb_last_bgsave_status:err")
            && run.stderr.contains("its log says why"),
        "{}",
        run.stderr
    );
}
