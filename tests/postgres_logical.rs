//! Logical PostgreSQL backups against real clusters: a round trip that proves equality,
//! the password kept out of argv and logs, pg_dump failures that commit nothing, and
//! restores that fail leaving the target as it was.

use std::path::Path;
use std::process::Stdio;

use crate::common::postgres::Postgres;
use crate::common::{
    Scenario, SeaweedFs, edit_manifest_object, lifeboat, lifeboat_command, procs, write_secret,
};

/// `lifeboat restore` of a postgres job into `target`, with the target's password in the
/// environment as an operator would have it.
fn restore_into(config: &Path, target: &Postgres, args: &[&str]) -> crate::common::Run {
    let mut command = lifeboat_command(config);
    command
        .env("PGPASSWORD", &target.password)
        .args(["restore", "maindb", "--target", &target.dsn("postgres")])
        .args(args);
    crate::common::run_command(&mut command)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logical_backup_restores_identical_databases_from_local_and_s3() {
    let s3 = SeaweedFs::start().await;
    s3.create_bucket("backups").await;
    let source = Postgres::start();
    source.create_app_database(1_000_000);
    let work = tempfile::tempdir().unwrap();
    let password_file = source.password_file(work.path(), &source.password);
    let config = Scenario::new(work.path())
        .local("local", &work.path().join("repo"))
        .raw(&s3.repository("s3", "backups", "lifeboat"))
        .postgres_job(
            "maindb",
            &source.dsn("postgres"),
            &password_file,
            "heartbeat = true",
        )
        .write();

    // Back up at the most verbose log level, watching every child's argv.
    let log_path = work.path().join("backup.log");
    let child = lifeboat_command(&config)
        .env_remove("PGPASSWORD")
        .args(["-vv", "backup", "maindb"])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log_path).unwrap())
        .spawn()
        .unwrap();
    let (argvs, status) = procs::watch(child);
    let log = std::fs::read_to_string(&log_path).unwrap();
    assert!(status.success(), "backup failed:\n{log}");
    assert!(
        argvs
            .values()
            .any(|argv| argv.contains("pg_dump --format=custom")),
        "pg_dump was never seen: {argvs:?}"
    );
    assert!(
        argvs
            .values()
            .any(|argv| argv.contains("pg_dumpall --globals-only")),
        "pg_dumpall was never seen: {argvs:?}"
    );
    for argv in argvs.values() {
        assert!(
            !argv.contains(&source.password),
            "the password is in a child's argv: {argv}"
        );
    }
    assert!(
        log.contains("TRACE") || log.contains("DEBUG"),
        "the log is at -vv"
    );
    assert!(
        !log.contains(&source.password),
        "the password is in the log"
    );

    // The manifest: one object per database plus the globals, and a snapshot-time recovery point.
    let show = lifeboat(
        &config,
        &["show", "latest", "--job", "maindb", "--format", "json"],
    );
    show.assert_code(0);
    let manifest: serde_json::Value = serde_json::from_str(&show.stdout).unwrap();
    assert_eq!(manifest["kind"], "postgres-logical");
    let names: Vec<&str> = manifest["objects"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        ["app.dump.zst", "postgres.dump.zst", "globals.sql.zst"]
    );
    assert_eq!(
        manifest["source"]["databases"],
        serde_json::json!(["app", "postgres"])
    );
    assert!(
        manifest["source"]["server_version"]
            .as_str()
            .unwrap()
            .starts_with(&source.psql("postgres", "show server_version"))
    );
    assert!(
        manifest["source"]["system_identifier"]
            .as_str()
            .is_some_and(|id| !id.is_empty())
    );
    let point = manifest["recovery_point"].as_str().unwrap();
    assert!(
        manifest["started_at"].as_str().unwrap() <= point
            && point <= manifest["finished_at"].as_str().unwrap()
    );

    let schema = source.schema("app");
    let fingerprint = source.data_fingerprint("app");
    let heartbeat = source.psql(
        "app",
        "select at from lifeboat.heartbeat where job = 'maindb'",
    );
    assert!(
        fingerprint.contains("shop.orders 1000000 "),
        "{fingerprint}"
    );

    // From the local repository into a fresh cluster: one database, with the roles.
    let first = Postgres::start();
    restore_into(
        &config,
        &first,
        &["--from", "local", "--database", "app", "--globals"],
    )
    .assert_code(0);
    assert_eq!(
        first.psql(
            "postgres",
            "select count(*) from pg_roles where rolname in ('app_owner', 'app_reader')"
        ),
        "2"
    );
    assert_eq!(first.schema("app"), schema, "schema differs after restore");
    assert_eq!(
        first.data_fingerprint("app"),
        fingerprint,
        "data differs after restore"
    );
    assert_eq!(
        first.psql(
            "app",
            "select at from lifeboat.heartbeat where job = 'maindb'"
        ),
        heartbeat
    );

    // A database that holds tables is not restored over without --clean.
    let again = restore_into(&config, &first, &["--from", "local", "--database", "app"]);
    again.assert_code(1);
    assert!(
        again
            .stderr
            .contains("unable to restore into database 'app'")
            && again.stderr.contains("already holds")
            && again
                .stderr
                .contains("relations (tables, views, sequences, indexes)"),
        "{}",
        again.stderr
    );
    // Nor one without a table that holds what someone made there (here a publication, a
    // foreign server and default privileges): it would be dropped after the swap.
    first.psql("postgres", "create database made");
    first.psql(
        "made",
        "create publication everything; create foreign data wrapper w; create server s foreign data wrapper w; \
         alter default privileges grant select on tables to public",
    );
    let made = restore_into(
        &config,
        &first,
        &["--from", "local", "--database", "app", "--as", "made"],
    );
    made.assert_code(1);
    assert!(
        made.stderr.contains("1 publications")
            && made.stderr.contains("1 foreign servers")
            && made.stderr.contains("1 default privileges"),
        "{}",
        made.stderr
    );
    assert_eq!(
        first.psql("made", "select count(*) from pg_publication"),
        "1"
    );
    first.psql(
        "app",
        "update shop.customers set name = 'changed' where id = 1",
    );
    restore_into(
        &config,
        &first,
        &["--from", "local", "--database", "app", "--clean"],
    )
    .assert_code(0);
    assert_eq!(
        first.data_fingerprint("app"),
        fingerprint,
        "--clean restores the backup's data"
    );
    // Side by side under another name, staged decompressed to load tables in parallel.
    restore_into(
        &config,
        &first,
        &[
            "--from",
            "local",
            "--database",
            "app",
            "--as",
            "app_copy",
            "--parallel-data",
        ],
    )
    .assert_code(0);
    assert_eq!(first.schema("app_copy"), schema);
    assert_eq!(first.data_fingerprint("app_copy"), fingerprint);

    // From S3 into another fresh cluster: every database of the backup.
    let second = Postgres::start();
    let run = restore_into(
        &config,
        &second,
        &["--from", "s3", "--globals", "--jobs", "2"],
    );
    run.assert_code(0);
    assert!(
        run.stdout.contains("globals, database 'app' (")
            && run.stdout.contains("database 'postgres' ("),
        "{}",
        run.stdout
    );
    assert_eq!(second.schema("app"), schema);
    assert_eq!(second.data_fingerprint("app"), fingerprint);
}

/// Waits until pg_dump has written `bytes` (so the upload is under way), then kills it.
fn kill_after_writing(pid: u32, bytes: u64) {
    procs::wait_until_written(pid, bytes);
    // SAFETY: kill(2) on the pid of a pg_dump this test saw lifeboat start.
    unsafe {
        libc::kill(pid as i32, libc::SIGKILL);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_pg_dump_commits_nothing_and_quotes_pg_dump() {
    let s3 = SeaweedFs::start().await;
    s3.create_bucket("backups").await;
    let source = Postgres::start();
    source.create_app_database(1_000_000);
    source.psql(
        "app",
        "create role limited login password 'limited-pw'; grant usage on schema shop to limited; \
         grant select on shop.customers, shop.orders to limited",
    );
    let work = tempfile::tempdir().unwrap();
    let repo = work.path().join("repo");
    let superuser_password = source.password_file(work.path(), &source.password);
    let limited_password = work.path().join("limited.pass");
    write_secret(&limited_password, "limited-pw", 0o600);
    let config = Scenario::new(work.path())
        .local("local", &repo)
        .raw(&s3.repository("s3", "backups", "lifeboat"))
        .postgres_job(
            "maindb",
            &source.dsn("postgres"),
            &superuser_password,
            "databases = [\"app\"]",
        )
        .postgres_job(
            "limited",
            &source.dsn_as("limited", "app"),
            &limited_password,
            "databases = [\"app\"]",
        )
        .write();
    let nothing_committed = || async {
        let local: Vec<_> = walkdir::WalkDir::new(&repo)
            .into_iter()
            .filter_map(Result::ok)
            .filter(|e| {
                e.file_name() == "manifest.json"
                    || e.file_name().to_string_lossy().contains(".lifeboat-tmp-")
            })
            .collect();
        assert!(local.is_empty(), "local repository: {local:?}");
        assert!(
            s3.manifest_keys("backups").await.is_empty(),
            "a manifest in S3"
        );
        assert!(
            s3.open_uploads("backups").await.is_empty(),
            "a multipart upload left open"
        );
    };

    // pg_dump killed midway, once several MiB went out.
    let log_path = work.path().join("killed.log");
    let mut child = lifeboat_command(&config)
        .args(["backup", "maindb"])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log_path).unwrap())
        .spawn()
        .unwrap();
    // The dump itself, not the `pg_dump --version` probe before it.
    let pg_dump =
        procs::wait_for_descendant(&mut child, |argv| argv.contains("pg_dump --format=custom"))
            .expect("pg_dump started");
    kill_after_writing(pg_dump, 12 * 1024 * 1024);
    let status = child.wait().unwrap();
    let log = std::fs::read_to_string(&log_path).unwrap();
    assert_eq!(status.code(), Some(1), "{log}");
    assert!(
        log.contains("error: unable to dump database 'app' with pg_dump"),
        "{log}"
    );
    assert!(log.contains("pg_dump failed (signal: 9"), "{log}");
    nothing_committed().await;

    // A permission error on one table: pg_dump's own words reach the operator.
    let run = lifeboat(&config, &["backup", "limited"]);
    run.assert_code(1);
    assert!(
        run.stderr
            .contains("permission denied for table order_lines"),
        "{}",
        run.stderr
    );
    nothing_committed().await;

    // A pg_dump older than the server is refused before anything runs.
    let old_bin = work.path().join("old-bin");
    std::fs::create_dir(&old_bin).unwrap();
    std::fs::write(
        old_bin.join("pg_dump"),
        "#!/bin/sh\necho 'pg_dump (PostgreSQL) 9.6.24'\n",
    )
    .unwrap();
    std::fs::set_permissions(
        old_bin.join("pg_dump"),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let old_config = Scenario::new(&old_bin)
        .local("local", &repo)
        .postgres_job(
            "maindb",
            &source.dsn("postgres"),
            &superuser_password,
            &format!("bin_dir = \"{}\"", old_bin.display()),
        )
        .write();
    let run = lifeboat(&old_config, &["backup", "maindb"]);
    run.assert_code(1);
    assert!(
        run.stderr
            .contains("the only client binaries found are older"),
        "{}",
        run.stderr
    );
    run.assert_stderr_has("install postgresql-client-15");
    nothing_committed().await;

    // The next normal run succeeds.
    lifeboat(&config, &["backup", "maindb"]).assert_code(0);
    assert_eq!(s3.manifest_keys("backups").await.len(), 1);
}

#[test]
fn a_password_file_readable_by_others_is_refused() {
    let work = tempfile::tempdir().unwrap();
    let password_file = work.path().join("pg.pass");
    write_secret(&password_file, "secret", 0o644);
    let config = Scenario::new(work.path())
        .local("local", &work.path().join("repo"))
        .postgres_job(
            "maindb",
            "postgresql://backup@127.0.0.1:1/postgres",
            &password_file,
            "",
        )
        .write();
    let run = lifeboat(&config, &["backup", "maindb"]);
    run.assert_code(2);
    assert!(
        run.stderr
            .contains("is readable by group or others (mode 0644)"),
        "{}",
        run.stderr
    );
    run.assert_stderr_has("chmod 600");
}

fn database_exists(cluster: &Postgres, name: &str) -> bool {
    cluster.psql(
        "postgres",
        &format!("select count(*) from pg_database where datname = '{name}'"),
    ) == "1"
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_restores_leave_the_target_as_it_was() {
    let source = Postgres::start();
    source.create_app_database(50_000);
    let work = tempfile::tempdir().unwrap();
    let repo = work.path().join("repo");
    let password_file = source.password_file(work.path(), &source.password);
    let config = Scenario::new(work.path())
        .local("local", &repo)
        .postgres_job(
            "maindb",
            &source.dsn("postgres"),
            &password_file,
            "databases = [\"app\"]",
        )
        .write();
    lifeboat(&config, &["backup", "maindb"]).assert_code(0);
    let target = Postgres::start();
    let roles = "select count(*) from pg_roles where rolname like 'app_%'";

    // The objects' owner and a grantee are not roles there: refused from the dump's table of
    // contents before any database is created (not by pg_restore failing halfway), naming
    // both roles and the ways out.
    let run = restore_into(&config, &target, &["--database", "app"]);
    run.assert_code(1);
    run.assert_stderr_has(
        "roles the server lacks: 'app_owner' (database app), 'app_reader' (database app)",
    );
    assert!(
        run.stderr.contains("--globals") && run.stderr.contains("--no-owner"),
        "{}",
        run.stderr
    );
    assert!(
        run.stderr.contains("nothing was created on the server")
            && !run.stderr.contains("pg_restore"),
        "{}",
        run.stderr
    );
    assert!(!database_exists(&target, "app"));

    // The decompressed bytes turn out not to be the ones backed up, which is only known once
    // they have all gone into pg_restore: the restored database is dropped again.
    edit_manifest_object(&repo, "app.dump.zst", |object| {
        object["raw_sha256"] = serde_json::json!("0".repeat(64));
    });
    let run = restore_into(&config, &target, &["--database", "app", "--globals"]);
    run.assert_code(1);
    assert!(
        run.stderr.contains("damaged object") && run.stderr.contains("decompressed sha256"),
        "{}",
        run.stderr
    );
    run.assert_stderr_has("were dropped");
    assert!(!run.stderr.contains("--globals"), "{}", run.stderr);
    assert!(!database_exists(&target, "app"));
    target.psql("postgres", "drop role app_owner; drop role app_reader");

    // A flipped stored byte is found while downloading, before anything reaches the server:
    // not even the globals are restored.
    let stored = walkdir::WalkDir::new(&repo)
        .into_iter()
        .filter_map(Result::ok)
        .find(|e| e.file_name() == "app.dump.zst")
        .unwrap()
        .into_path();
    let mut bytes = std::fs::read(&stored).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x20;
    std::fs::write(&stored, bytes).unwrap();
    let run = restore_into(&config, &target, &["--database", "app", "--globals"]);
    run.assert_code(1);
    assert!(
        run.stderr.contains("damaged object") && run.stderr.contains("stored sha256"),
        "{}",
        run.stderr
    );
    assert!(!database_exists(&target, "app"));
    assert_eq!(target.psql("postgres", roles), "0");
}
