//! `restore --clean` replaces a live database by loading beside it and swapping names:
//! stopped at any moment by SIGINT, SIGTERM or SIGKILL, the live database is exactly as it
//! was and no pg_restore outlives lifeboat; sessions on it are waited for, a bounded time.

use std::path::Path;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use crate::common::postgres::{Postgres, bin_dir};
use crate::common::{lifeboat, lifeboat_command, run_command};

/// Per table of `database`: its row count and an order-independent sum of its rows' hashes.
/// Cheap enough to take fifteen times over three million rows.
fn row_checksums(cluster: &Postgres, database: &str) -> String {
    let tables = cluster.psql(
        database,
        "select format('%I.%I', n.nspname, c.relname) from pg_class c join pg_namespace n on n.oid = c.relnamespace \
         where c.relkind = 'r' and n.nspname not in ('pg_catalog', 'information_schema') order by 1",
    );
    tables
        .lines()
        .map(|table| {
            let sum = cluster.psql(
                database,
                &format!("select count(*) || ' ' || coalesce(sum(hashtext(t::text)::bigint), 0) from {table} t"),
            );
            format!("{table} {sum}")
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn databases_like(cluster: &Postgres, pattern: &str) -> Vec<String> {
    cluster
        .psql(
            "postgres",
            &format!("select datname from pg_database where datname like '{pattern}' order by 1"),
        )
        .lines()
        .map(str::to_string)
        .collect()
}

/// A work directory and a config whose job `maindb` backs up `app` of `cluster` into a
/// local repository.
fn job_of_app(cluster: &Postgres) -> (tempfile::TempDir, std::path::PathBuf) {
    let work = tempfile::tempdir().unwrap();
    let config = crate::common::maindb_config(work.path(), cluster, &["app"], "");
    (work, config)
}

/// The pg_restore processes restoring into `cluster` (any parent), by argv.
fn pg_restores_into(cluster: &Postgres) -> Vec<String> {
    let port = format!("port='{}'", cluster.port);
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().parse::<u32>().is_ok())
        .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
        .map(|raw| String::from_utf8_lossy(&raw).replace('\0', " "))
        .filter(|argv| argv.contains("pg_restore") && argv.contains(&port))
        .collect()
}

/// `restore --clean` of `app` into `target`, staging in `config`'s directory's `tmp`.
fn restore_clean(config: &Path, target: &Postgres, extra: &[&str]) -> Child {
    let tmp = config.parent().unwrap().join("tmp");
    std::fs::create_dir_all(&tmp).unwrap();
    lifeboat_command(config)
        .env("PGPASSWORD", &target.password)
        .env("TMPDIR", tmp)
        .args(["restore", "maindb", "--database", "app", "--clean"])
        .args(["--target", &target.dsn("postgres")])
        // Every test here rolls the job's own source back, as after a bad migration.
        .arg("--yes-this-is-the-source")
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// The argv of every descendant of `pid`.
fn descendants_argv(pid: u32) -> Vec<String> {
    let mut family = vec![pid];
    let mut found = Vec::new();
    let mut grew = true;
    while grew {
        grew = false;
        for entry in std::fs::read_dir("/proc").unwrap().filter_map(Result::ok) {
            let Ok(child) = entry.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            if family.contains(&child) {
                continue;
            }
            let stat = std::fs::read_to_string(entry.path().join("stat")).unwrap_or_default();
            let parent = stat
                .rfind(')')
                .and_then(|at| stat[at + 2..].split(' ').nth(1))
                .and_then(|p| p.parse::<u32>().ok());
            if parent.is_some_and(|p| family.contains(&p)) {
                family.push(child);
                grew = true;
                if let Ok(raw) = std::fs::read(entry.path().join("cmdline")) {
                    found.push(String::from_utf8_lossy(&raw).replace('\0', " "));
                }
            }
        }
    }
    found
}

/// Waits (2 ms polls, 60 s at most) until `ready` holds of lifeboat's children's argv;
/// false if lifeboat ended first.
fn wait_for(child: &mut Child, ready: &mut dyn FnMut(&[String]) -> bool) -> bool {
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        if child.try_wait().unwrap().is_some() {
            return false;
        }
        if ready(&descendants_argv(child.id())) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    panic!("the restore never reached the moment waited for");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clean_restore_stopped_at_any_moment_leaves_the_live_database_as_it_was() {
    let cluster = Postgres::start();
    cluster.create_app_database(50_000);
    cluster.psql(
        "app",
        "create table shop.big as select g as id, md5(g::text) as note from generate_series(1, 3000000) g; \
         alter table shop.big add primary key (id)",
    );
    let (work, config) = job_of_app(&cluster);
    lifeboat(&config, &["backup", "maindb"]).assert_code(0);
    let backed_up = row_checksums(&cluster, "app");
    // The live database moves on after the backup: a restore must not touch it unless it
    // ends with the swap.
    cluster.psql(
        "app",
        "update shop.big set note = 'changed' where id <= 1000; delete from shop.orders where id > 49000",
    );
    let live = row_checksums(&cluster, "app");
    assert_ne!(live, backed_up);

    // Five moments: staging, the schema, the data, the indexes, and after pg_restore
    // (counting rows, setting properties), each met by the three signals.
    type Moment = (&'static str, fn(&mut Child, &Path) -> bool);
    let moments: [Moment; 5] = [
        ("while staging", |child, tmp| {
            wait_for(child, &mut |_| {
                std::fs::read_dir(tmp).unwrap().any(|e| {
                    e.unwrap()
                        .file_name()
                        .to_string_lossy()
                        .starts_with("lifeboat-restore-")
                })
            })
        }),
        ("while pg_restore creates the schema", |child, _| {
            wait_for(child, &mut |argv| {
                argv.iter().any(|a| a.contains("--section=pre-data"))
            })
        }),
        ("while pg_restore loads the data", |child, _| {
            let reached = wait_for(child, &mut |argv| {
                argv.iter().any(|a| a.contains("--section=data"))
            });
            std::thread::sleep(Duration::from_millis(300));
            reached
        }),
        ("while pg_restore builds the indexes", |child, _| {
            wait_for(child, &mut |argv| {
                argv.iter().any(|a| a.contains("--section=post-data"))
            })
        }),
        ("after pg_restore, before the swap", |child, _| {
            let mut seen = false;
            wait_for(child, &mut |argv| {
                let now = argv.iter().any(|a| a.contains("--section=post-data"));
                let done = seen && !now;
                seen |= now;
                done
            })
        }),
    ];
    for signal in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP, libc::SIGKILL] {
        for (moment, reach) in &moments {
            let mut child = restore_clean(&config, &cluster, &[]);
            assert!(
                reach(&mut child, &work.path().join("tmp")),
                "the restore ended before {moment}: {:?}",
                child.wait_with_output()
            );
            // SAFETY: kill(2) on the lifeboat this test started.
            unsafe {
                libc::kill(child.id() as i32, signal);
            }
            let output = child.wait_with_output().unwrap();
            let stderr = String::from_utf8_lossy(&output.stderr);
            let what = format!("signal {signal} {moment}");
            match signal {
                libc::SIGKILL => assert_eq!(output.status.code(), None, "{what}: {stderr}"),
                // As a shell reports a process the signal ended: 128 + its number.
                _ => assert_eq!(output.status.code(), Some(128 + signal), "{what}: {stderr}"),
            }
            // Workers pg_restore forked die with it too, however lifeboat ended.
            let deadline = Instant::now() + Duration::from_secs(1);
            while !pg_restores_into(&cluster).is_empty() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            assert_eq!(
                pg_restores_into(&cluster),
                Vec::<String>::new(),
                "{what}: pg_restore outlived lifeboat"
            );
            assert_eq!(
                row_checksums(&cluster, "app"),
                live,
                "{what}: the live database changed"
            );
            if signal != libc::SIGKILL {
                assert_eq!(
                    databases_like(&cluster, "app\\_%"),
                    Vec::<String>::new(),
                    "{what}: {stderr}"
                );
                // Nor a staging directory, however early the signal came: the next restore's
                // "while staging" would take it for its own.
                let left: Vec<_> = std::fs::read_dir(work.path().join("tmp"))
                    .unwrap()
                    .map(|e| e.unwrap().file_name())
                    .collect();
                assert_eq!(left, Vec::<std::ffi::OsString>::new(), "{what}: {stderr}");
            }
        }
    }

    // A restore that runs to its end sweeps what the killed ones left (they ran here and
    // are gone), swaps, and keeps the database it replaced under a name it prints.
    let child = restore_clean(&config, &cluster, &[]);
    let output = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(0), "{stderr}");
    assert!(
        stdout.contains("left on the server by a restore on this host that was killed"),
        "{stdout}"
    );
    assert_eq!(row_checksums(&cluster, "app"), backed_up);
    let kept = databases_like(&cluster, "app\\_before\\_%");
    assert_eq!(kept.len(), 1, "{kept:?}");
    assert!(
        stdout.contains(&format!(
            "the database it replaced is kept as '{}'",
            kept[0]
        )),
        "{stdout}"
    );
    assert!(
        stdout.contains("database 'app' (") && stdout.contains(" rows; "),
        "{stdout}"
    );
    assert_eq!(row_checksums(&cluster, &kept[0]), live);
    assert_eq!(
        databases_like(&cluster, "app\\_restoring\\_%"),
        Vec::<String>::new()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clean_restore_waits_a_bounded_time_for_sessions_then_changes_nothing() {
    let cluster = Postgres::start();
    cluster.create_app_database(50_000);
    let (_work, config) = job_of_app(&cluster);
    lifeboat(&config, &["backup", "maindb"]).assert_code(0);
    cluster.psql(
        "app",
        "update shop.customers set name = 'live' where id = 1",
    );
    let live = row_checksums(&cluster, "app");

    // The target is the job's own source: --clean would roll the live primary back to the
    // backup. Refused unless said in so many words, before anything is loaded.
    let refused = run_command(
        lifeboat_command(&config)
            .env("PGPASSWORD", &cluster.password)
            .args(["restore", "maindb", "--database", "app", "--clean"])
            .args(["--target", &cluster.dsn("postgres")]),
    );
    assert_ne!(refused.code, 0);
    assert!(
        refused.stderr.contains("refusing --clean on")
            && refused.stderr.contains("it is the server backup maindb/")
            && refused.stderr.contains("--yes-this-is-the-source")
            && refused.stderr.contains("--as NAME_restored"),
        "{}",
        refused.stderr
    );
    assert_eq!(row_checksums(&cluster, "app"), live);
    assert!(databases_like(&cluster, "app\\_%").is_empty());
    // A role that may not read the system identifier cannot tell the source from another
    // server: refused all the same.
    cluster.psql(
        "postgres",
        "revoke execute on function pg_control_system() from public; \
         create role clean_runner login createdb password 'clean-runner-pw'",
    );
    let blind = run_command(
        lifeboat_command(&config)
            .env("PGPASSWORD", "clean-runner-pw")
            .args(["restore", "maindb", "--database", "app", "--clean"])
            .args(["--target", &cluster.dsn_as("clean_runner", "postgres")]),
    );
    assert_ne!(blind.code, 0);
    assert!(
        blind
            .stderr
            .contains("its system identifier cannot be read"),
        "{}",
        blind.stderr
    );
    assert_eq!(row_checksums(&cluster, "app"), live);

    // A session sits in an open transaction on the live database.
    let mut session = open_transaction(&cluster, "app", "select count(*) from shop.customers");

    let started = Instant::now();
    let output = restore_clean(&config, &cluster, &["--swap-wait", "2s"])
        .wait_with_output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "the wait was not bounded"
    );
    assert!(
        stderr.contains("unable to replace 'app'")
            && stderr.contains("still in use after waiting 2s")
            && stderr.contains("idle in transaction")
            && stderr.contains("--terminate-sessions")
            && stderr.contains("nothing on the server was changed"),
        "{stderr}"
    );
    assert_eq!(row_checksums(&cluster, "app"), live);
    assert_eq!(databases_like(&cluster, "app\\_%"), Vec::<String>::new());

    // Told to, it ends the session when the swap comes, and drops what it replaced.
    let output = restore_clean(
        &config,
        &cluster,
        &["--terminate-sessions", "--drop-previous"],
    )
    .wait_with_output()
    .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_eq!(
        output.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        stdout.contains("the database it replaced was dropped"),
        "{stdout}"
    );
    assert_ne!(row_checksums(&cluster, "app"), live);
    assert_eq!(databases_like(&cluster, "app\\_%"), Vec::<String>::new());
    drop(session.stdin.take());
    let _ = session.wait();
}

/// A psql session on `database` that has run `sql` in a transaction it keeps open.
fn open_transaction(cluster: &Postgres, database: &str, sql: &str) -> Child {
    let mut session = std::process::Command::new(bin_dir().join("psql"))
        .env("PGPASSWORD", &cluster.password)
        .arg(format!("--dbname={}", cluster.dsn(database)))
        .args(["--no-psqlrc", "--quiet"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    {
        use std::io::Write;
        let stdin = session.stdin.as_mut().unwrap();
        stdin
            .write_all(format!("begin; {sql};\n").as_bytes())
            .unwrap();
        stdin.flush().unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while cluster.psql(
        "postgres",
        "select count(*) from pg_stat_activity where state = 'idle in transaction'",
    ) != "1"
    {
        assert!(
            Instant::now() < deadline,
            "the session never opened its transaction"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    session
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restore_killed_while_its_swap_waits_never_swaps_after_its_death() {
    let cluster = Postgres::start();
    cluster.create_app_database(50_000);
    let (_work, config) = job_of_app(&cluster);
    lifeboat(&config, &["backup", "maindb"]).assert_code(0);
    cluster.psql(
        "app",
        "update shop.customers set name = 'live' where id = 1",
    );
    let live = row_checksums(&cluster, "app");

    // A session elsewhere holds a lock on the database: the swap can only wait.
    let mut blocker = open_transaction(
        &cluster,
        "postgres",
        "alter database app connection limit 40",
    );
    let mut child = restore_clean(&config, &cluster, &["--swap-wait", "60s"]);
    let mut seen = false;
    assert!(
        wait_for(&mut child, &mut |argv| {
            let now = argv.iter().any(|a| a.contains("pg_restore"));
            let done = seen && !now;
            seen |= now;
            done
        }),
        "the restore ended before its swap"
    );
    // In the swap's wait for the lock now (a try gives up after 1 s and starts again).
    std::thread::sleep(Duration::from_millis(2500));
    assert!(
        child.try_wait().unwrap().is_none(),
        "the restore did not wait"
    );
    child.kill().unwrap();
    child.wait().unwrap();
    std::thread::sleep(Duration::from_millis(500));
    {
        use std::io::Write;
        let stdin = blocker.stdin.as_mut().unwrap();
        stdin.write_all(b"rollback;\n").unwrap();
        stdin.flush().unwrap();
    }
    drop(blocker.stdin.take());
    let _ = blocker.wait();
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(row_checksums(&cluster, "app"), live);
    assert_eq!(
        databases_like(&cluster, "app\\_before\\_%"),
        Vec::<String>::new()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_comment_that_looks_like_lifeboats_mark_drops_nothing() {
    let cluster = Postgres::start();
    cluster.create_app_database(50_000);
    let (_work, config) = job_of_app(&cluster);
    let host = hostname::get().unwrap().into_string().unwrap();
    let oid = cluster.psql(
        "postgres",
        "select oid from pg_database where datname = 'app'",
    );
    // The owner of a database may comment on it: here, as lifeboat marks a copy it loads,
    // for a restore on this host whose process is gone, with the database's own oid.
    cluster.psql(
        "postgres",
        &format!(
            "comment on database app is 'lifeboat: restore in progress: backup maindb/1 into ''app'' by pid 4000000 on host {host} since 2020-01-01T00:00:00Z (database oid {oid})'"
        ),
    );
    lifeboat(&config, &["backup", "maindb"]).assert_code(0);
    let output = restore_clean(&config, &cluster, &["--drop-previous"])
        .wait_with_output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_eq!(
        output.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        stdout.contains("not restored") && stdout.contains("COMMENT ON DATABASE"),
        "{stdout}"
    );
    let live = row_checksums(&cluster, "app");
    // Marked by hand on the live database itself: named by no restore, dropped by none.
    let oid = cluster.psql(
        "postgres",
        "select oid from pg_database where datname = 'app'",
    );
    cluster.psql(
        "postgres",
        &format!(
            "comment on database app is 'lifeboat: restore in progress: backup maindb/1 into ''app'' by pid 4000000 on host {host} since 2020-01-01T00:00:00Z (database oid {oid})'"
        ),
    );
    let run = crate::common::run_command(
        lifeboat_command(&config)
            .env("PGPASSWORD", &cluster.password)
            .args(["restore", "maindb", "--database", "app", "--as", "app_copy"])
            .args(["--target", &cluster.dsn("postgres")]),
    );
    run.assert_code(0);
    assert!(
        !run.stdout.contains("dropped database 'app'"),
        "{}",
        run.stdout
    );
    assert_eq!(row_checksums(&cluster, "app"), live);
}
